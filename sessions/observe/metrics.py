"""Prometheus metrics of one session manager.

Each manager has a registry of its own (not the process-wide default), so tests can build
several managers and every app shows the figures of its own manager.
"""

import asyncio
import gc
import time
from typing import Any, Callable, Dict, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Steps take ~10 ms on a tiny local model and seconds on a large public one.
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GC_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# How often the event loop's lag is sampled: often enough to see short stalls, rarely enough to cost nothing.
LOOP_LAG_INTERVAL = 0.1


class SessionMetrics:
    """The server's counters, gauges and histograms, and the registry that exports them."""

    def __init__(self, open_sessions: Callable[[], float], executor_queue_depth: Callable[[], float],
                 reserved_state_bytes: Callable[[], float], state_budget_bytes: float):
        self.registry = CollectorRegistry()
        self.open_sessions = Gauge(
            "swarm_chat_open_sessions", "Inference sessions holding attention caches in the swarm",
            registry=self.registry)
        self.open_sessions.set_function(open_sessions)
        self.executor_queue_depth = Gauge(
            "swarm_chat_executor_queue_depth", "Blocking Petals calls waiting for a free executor thread",
            registry=self.registry)
        self.executor_queue_depth.set_function(executor_queue_depth)
        self.state_bytes = Gauge(
            "swarm_chat_session_state_bytes",
            "Memory the open sessions hold on this machine (each token's hidden state per server span)",
            registry=self.registry)
        self.reserved_state_bytes = Gauge(
            "swarm_chat_session_state_reserved_bytes",
            "Memory the open sessions' state may grow to (their max_length), counted against the budget",
            registry=self.registry)
        self.reserved_state_bytes.set_function(reserved_state_bytes)
        self.state_budget_bytes = Gauge(
            "swarm_chat_session_state_budget_bytes",
            "The memory budget for session state (--session-memory-budget-mib)", registry=self.registry)
        self.state_budget_bytes.set(state_budget_bytes)
        self.sessions_opened = Counter(
            "swarm_chat_sessions_opened", "Inference sessions opened", ["model"], registry=self.registry)
        self.steps = Counter(
            "swarm_chat_steps", "Generation steps run through the swarm, by outcome", ["model", "outcome"],
            registry=self.registry)
        self.generated_tokens = Counter(
            "swarm_chat_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.input_tokens = Counter(
            "swarm_chat_input_tokens", "Prompt and follow-up tokens fed through the swarm", ["model"],
            registry=self.registry)
        self.step_seconds = Histogram(
            "swarm_chat_step_seconds", "Time of one generation step, swarm round trip included", ["model"],
            buckets=STEP_SECONDS_BUCKETS, registry=self.registry)
        self._step_series: Dict[str, Tuple[Counter, Histogram, Counter, Counter]] = {}  # per model
        self.drafted_tokens = Counter(
            "swarm_chat_drafted_tokens", "Draft tokens steps verified (speculative decoding), by draft source",
            ["model", "source"], registry=self.registry)
        self.accepted_draft_tokens = Counter(
            "swarm_chat_accepted_draft_tokens", "Draft tokens the model chose too, by draft source",
            ["model", "source"], registry=self.registry)
        self.gc_pause_seconds = Histogram(
            "swarm_chat_gc_pause_seconds", "Pauses of Python's garbage collector, by generation collected",
            ["generation"], buckets=GC_PAUSE_BUCKETS, registry=self.registry)
        self._gc_started: Optional[float] = None
        self.server_step_seconds = Histogram(
            "swarm_chat_server_step_seconds", "One swarm server's part of a generation step (the first 32 "
            "servers seen have a label of their own, later ones share \"other\")", ["server"],
            buckets=STEP_SECONDS_BUCKETS, registry=self.registry)
        self.prefix_requests = Counter(
            "swarm_chat_prefix_reuse_requests",
            "Stateless requests by whether they continued a warm session (hit) or opened one (miss)",
            ["model", "outcome"], registry=self.registry)
        self.prefix_reused_tokens = Counter(
            "swarm_chat_prefix_reused_tokens", "Prompt tokens not fed through the swarm again thanks to a warm session",
            ["model"], registry=self.registry)
        self.warm_sessions = Gauge(
            "swarm_chat_warm_sessions", "Finished sessions kept warm for a request that continues them",
            registry=self.registry)
        self.detached_sessions = Gauge(
            "swarm_chat_detached_sessions",
            "Resumable WebSocket sessions whose connection dropped, waiting for their client",
            registry=self.registry)
        self.steps_in_flight_limit = Gauge(
            "swarm_chat_steps_in_flight_limit", "Swarm steps that may run at once now (adaptive on a joined swarm)",
            registry=self.registry)
        self.waiting_sessions = Gauge(
            "swarm_chat_waiting_sessions", "New sessions waiting in line for room on a full server",
            registry=self.registry)
        self.errors = Counter(
            "swarm_chat_errors", "Errors answered to clients, by error code", ["code"], registry=self.registry)
        self.event_loop_lag_seconds = Histogram(
            "swarm_chat_event_loop_lag_seconds",
            f"How late a callback due every {LOOP_LAG_INTERVAL} s runs on the event loop", buckets=LOOP_LAG_BUCKETS,
            registry=self.registry)

    async def watch_event_loop(self, interval: float = LOOP_LAG_INTERVAL) -> None:
        """Samples, until cancelled, how late the event loop runs a callback due every ``interval``
        seconds into ``swarm_chat_event_loop_lag_seconds`` (whatever holds the loop delays it)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.event_loop_lag_seconds.observe(max(0.0, loop.time() - due))

    def watch_gc(self) -> None:
        """Starts timing the interpreter's garbage collections (each one pauses every thread,
        the event loop included) into ``swarm_chat_gc_pause_seconds``."""
        if self._time_gc not in gc.callbacks:
            gc.callbacks.append(self._time_gc)

    def unwatch_gc(self) -> None:
        """Stops timing garbage collections."""
        if self._time_gc in gc.callbacks:
            gc.callbacks.remove(self._time_gc)

    def _time_gc(self, phase: str, info: dict) -> None:
        # A collection holds the interpreter lock from "start" to "stop": the two calls pair up.
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_pause_seconds.labels(str(info["generation"])).observe(time.perf_counter() - self._gc_started)
            self._gc_started = None

    def observe_step(self, model: str, seconds: float, input_tokens: int, tokens: int = 1) -> None:
        """Records one successful step: it fed ``input_tokens`` and generated ``tokens``."""
        series = self._step_series.get(model)
        if series is None:  # looked up once per model: this runs for every token
            series = self._step_series[model] = (
                self.steps.labels(model, "ok"), self.step_seconds.labels(model),
                self.generated_tokens.labels(model), self.input_tokens.labels(model))
        steps, step_seconds, generated_tokens, fed_tokens = series
        steps.inc()
        step_seconds.observe(seconds)
        generated_tokens.inc(tokens)
        fed_tokens.inc(input_tokens)

    def observe_drafts(self, model: str, counts: Any) -> None:
        """Adds a generation's draft tokens and accepted ones (a ``DraftCounts``), by source."""
        for source, drafted in counts.drafted.items():
            if drafted:
                self.drafted_tokens.labels(model, source).inc(drafted)
                self.accepted_draft_tokens.labels(model, source).inc(counts.accepted[source])

    def observe_server_step(self, server: str, seconds: float) -> None:
        """Records one server's part of one step."""
        self.server_step_seconds.labels(server).observe(seconds)

    def observe_prefix_reuse(self, model: str, reused_tokens: int) -> None:
        """Records a stateless request that continued a warm session holding ``reused_tokens``
        of its prompt (0: it opened a fresh session)."""
        self.prefix_requests.labels(model, "hit" if reused_tokens else "miss").inc()
        self.prefix_reused_tokens.labels(model).inc(reused_tokens)

    def observe_failed_step(self, model: str) -> None:
        """Records a step the swarm did not complete."""
        self.steps.labels(model, "error").inc()

    def count_error(self, code: str) -> None:
        """Records an error answered to a client."""
        self.errors.labels(code).inc()
