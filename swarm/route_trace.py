"""Route traces: which swarm server served which blocks of each step, how long it took, what failed.

petals builds each inference session's route (runs of blocks, each on one server) and routes
around a server that fails, but keeps no account of it. ``trace_server_steps`` wraps the step
of petals' per-server session: while a thread runs a step inside ``recording(recorder)``, each
server's part of the step is timed into ``recorder``, and each failure is noted with its reason.
Steps run outside ``recording`` cost one thread-local lookup.
"""

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

# A generation keeps this many failures; later ones are counted only.
MAX_EVENTS = 16
REASON_CHARS = 200

_current = threading.local()


@dataclass
class _SpanTime:
    steps: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RouteEvent:
    """A server's failure during one of the generation's steps (counted from 1)."""

    step: int
    peer_id: str
    start: int
    end: int
    reason: str


class RouteRecorder:
    """The route of one session's current generation: per server span, its steps and time.

    ``observe(peer_id, seconds)`` (optional) also hears of every server step, e.g. for per-server
    latency across sessions. Written by the thread running the session's step, read between steps.
    """

    def __init__(self, observe: Optional[Callable[[str, float], None]] = None):
        self._observe = observe
        self.reset()

    def reset(self) -> None:
        """Starts a new trace (at the start of each generation)."""
        self.steps = 0
        self.step_seconds = 0.0
        self.spans: Dict[Tuple[str, int, int], _SpanTime] = {}
        self.events: List[RouteEvent] = []
        self.failures = 0

    def step_done(self, seconds: float) -> None:
        """One whole step (every span, plus the local layers) took ``seconds``."""
        self.steps += 1
        self.step_seconds += seconds

    def span_done(self, peer_id: str, start: int, end: int, seconds: float) -> None:
        """A server ran blocks ``start:end`` of the current step in ``seconds``."""
        span = self.spans.setdefault((peer_id, start, end), _SpanTime())
        span.steps += 1
        span.seconds += seconds
        if self._observe is not None:
            self._observe(peer_id, seconds)

    def span_failed(self, peer_id: str, start: int, end: int, reason: str) -> None:
        """A server failed blocks ``start:end`` of the current step; petals retries elsewhere."""
        self.failures += 1
        if len(self.events) < MAX_EVENTS:
            self.events.append(RouteEvent(self.steps + 1, peer_id, start, end, reason[:REASON_CHARS]))

    def summary(self) -> Dict[str, Any]:
        """The trace as the APIs show it: every server span in route order with its mean time
        per step and its share of the step time, and the failures."""
        total = self.step_seconds or 1.0
        spans = [{"peer_id": peer_id, "blocks": [start, end], "steps": span.steps,
                  "ms_per_step": round(1000 * span.seconds / span.steps, 2),
                  "share": round(span.seconds / total, 3)}
                 for (peer_id, start, end), span in sorted(self.spans.items(), key=lambda item: item[0][1])]
        return {"steps": self.steps,
                "ms_per_step": round(1000 * self.step_seconds / self.steps, 2) if self.steps else None,
                "spans": spans,
                "failures": self.failures,
                "events": [{"step": event.step, "peer_id": event.peer_id, "blocks": [event.start, event.end],
                            "reason": event.reason} for event in self.events]}


@contextmanager
def recording(recorder: RouteRecorder) -> Iterator[None]:
    """Server steps this thread runs inside the block are recorded into ``recorder``."""
    _current.recorder = recorder
    started = time.perf_counter()
    try:
        yield
    finally:
        _current.recorder = None
    recorder.step_done(time.perf_counter() - started)


def trace_server_steps(server_session_class: Any) -> None:
    """Wraps ``server_session_class.step`` (petals' ``_ServerInferenceSession``) to record each
    server's part of a step into the recorder of the thread running it."""
    untraced_step = server_session_class.step

    def step(self, inputs, prompts, hypo_ids, *, step_id):
        recorder = getattr(_current, "recorder", None)
        if recorder is None:
            return untraced_step(self, inputs, prompts, hypo_ids, step_id=step_id)
        span, started = self.span, time.perf_counter()
        try:
            outputs = untraced_step(self, inputs, prompts, hypo_ids, step_id=step_id)
        except Exception as error:
            recorder.span_failed(str(span.peer_id), span.start, span.end, f"{type(error).__name__}: {error}")
            raise
        recorder.span_done(str(span.peer_id), span.start, span.end, time.perf_counter() - started)
        return outputs

    server_session_class.step = step
