"""Load and soak clients of the WebSocket API, and what they measure on the server.

``run_load`` keeps many streams generating at once for a while; ``run_soak`` opens and closes
many short sessions. ``ProcessSample`` and ``scrape_open_sessions`` read what a server holds
before and after. Used by ``bench/load_soak.py`` (full size, against a server process),
``bench/abuse.py`` and ``tests/test_load.py`` (short, against the in-process app);
``tests/test_fuzz.py`` reads the open sessions with it.
"""

import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Counter, List, Optional

import psutil
import tornado.httpclient
import tornado.websocket
from prometheus_client.parser import text_string_to_metric_families

from bench.common import NEVER, PROMPT, percentile

PROMPT_TOKEN_ALLOWANCE = 32  # room for PROMPT in a session, whatever the tokenizer makes of it
SOAK_INPUTS = "Hello"
OPEN_SESSIONS_METRIC = "swarm_chat_open_sessions"


class ClientError(Exception):
    """What a load client counts as an error: an error reply, a dropped connection, a silent server."""


def _describe(error: BaseException) -> str:
    if isinstance(error, ClientError):
        return str(error)
    return f"{type(error).__name__}: {str(error)[:120]}"


async def _connect(url: str, timeout: float) -> tornado.websocket.WebSocketClientConnection:
    request = tornado.httpclient.HTTPRequest(url, connect_timeout=timeout, request_timeout=timeout)
    return await tornado.websocket.websocket_connect(request)


async def _send(connection: tornado.websocket.WebSocketClientConnection, message: dict) -> None:
    await connection.write_message(json.dumps(message))


async def _receive(connection: tornado.websocket.WebSocketClientConnection, timeout: float) -> dict:
    """The next reply; raises ClientError for an error reply, a close or no reply within ``timeout``."""
    try:
        raw = await asyncio.wait_for(connection.read_message(), timeout)
    except asyncio.TimeoutError:
        raise ClientError(f"no reply within {timeout:.0f} s") from None
    if raw is None:
        raise ClientError(f"connection closed by the server (code {connection.close_code})")
    reply = json.loads(raw)
    if not reply.get("ok"):
        first_line = str(reply.get("traceback", "")).splitlines()[0][:120] if reply.get("traceback") else ""
        raise ClientError(f"error reply ({reply.get('code')}): {first_line}")
    return reply


async def _open_session(url: str, model: str, max_length: int,
                        timeout: float) -> tornado.websocket.WebSocketClientConnection:
    """A connection holding an inference session of ``max_length`` tokens."""
    connection = await _connect(url, timeout)
    try:
        await _send(connection, {"type": "open_inference_session", "model": model, "max_length": max_length})
        await _receive(connection, timeout)
    except BaseException:
        connection.close()
        raise
    return connection


@dataclass
class LoadResult:
    """What ``run_load`` measured."""

    streams: int
    seconds: float = 0.0  # wall time of the phase, first connect to last close
    tokens: int = 0
    sessions: int = 0  # a stream opens a new session whenever its session is full
    generations: int = 0
    streams_with_tokens: int = 0
    latencies: List[float] = field(default_factory=list)  # seconds from the previous event to each token
    errors: Counter[str] = field(default_factory=collections.Counter)

    @property
    def error_count(self) -> int:
        """Every error of every stream."""
        return sum(self.errors.values())

    @property
    def tokens_per_s(self) -> float:
        """Tokens of all streams together per second of the phase."""
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def p50_ms(self) -> float:
        """Median per-token latency in milliseconds."""
        return 1000 * percentile(self.latencies, 0.5)

    @property
    def p99_ms(self) -> float:
        """99th-percentile per-token latency in milliseconds."""
        return 1000 * percentile(self.latencies, 0.99)


async def _stream_generation(connection, inputs: Optional[str], max_length: int, deadline: float,
                             timeout: float, result: LoadResult) -> int:
    """One streamed generate up to ``max_length`` session tokens; a ``stop`` ends it at the deadline."""
    message = {"type": "generate", "max_new_tokens": 1, "stop_sequence": NEVER, "max_length": max_length}
    if inputs is not None:
        message["inputs"] = inputs
    await _send(connection, message)
    last_event, stop_sent, tokens = time.monotonic(), False, 0
    while True:
        reply = await _receive(connection, timeout)
        now = time.monotonic()
        if reply["token_count"]:
            result.latencies.append(now - last_event)
            tokens += reply["token_count"]
        last_event = now
        if reply["stop"]:
            result.generations += 1
            return tokens
        if not stop_sent and now >= deadline:
            await _send(connection, {"type": "stop"})
            stop_sent = True


async def _stream_client(url: str, model: str, deadline: float, session_length: int, tokens_per_generate: int,
                         timeout: float, result: LoadResult) -> None:
    """Generates back to back until the deadline, in one session after another; ends at its first error."""
    tokens = 0
    try:
        while time.monotonic() < deadline:
            connection = await _open_session(url, model, session_length, timeout)
            result.sessions += 1
            try:
                inputs, max_length = PROMPT, PROMPT_TOKEN_ALLOWANCE + tokens_per_generate
                while max_length <= session_length and time.monotonic() < deadline:
                    tokens += await _stream_generation(connection, inputs, max_length, deadline, timeout, result)
                    inputs, max_length = None, max_length + tokens_per_generate
            finally:
                connection.close()
    except Exception as error:
        result.errors[_describe(error)] += 1
    finally:
        result.tokens += tokens
        result.streams_with_tokens += tokens > 0


async def run_load(url: str, model: str, streams: int, seconds: float, session_length: int = 256,
                   tokens_per_generate: int = 16, reply_timeout: float = 60.0) -> LoadResult:
    """``streams`` WebSocket clients streaming generations back to back for ``seconds``.

    Each client opens a session of ``session_length`` tokens and sends generates of
    ``tokens_per_generate`` tokens, streamed one token per reply (``max_new_tokens: 1``, a stop
    sequence that never appears, a growing ``max_length``); when the session is full it opens
    another. At the deadline it sends ``stop`` and closes. Every wait is bounded by
    ``reply_timeout``, so the phase ends a bounded time after ``seconds``.
    """
    if session_length < PROMPT_TOKEN_ALLOWANCE + tokens_per_generate:
        raise ValueError(f"session_length must be at least {PROMPT_TOKEN_ALLOWANCE + tokens_per_generate}")
    result = LoadResult(streams=streams)
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(_stream_client(url, model, deadline, session_length, tokens_per_generate, reply_timeout,
                                          result) for _ in range(streams)))
    result.seconds = time.monotonic() - started
    return result


@dataclass
class SoakResult:
    """What ``run_soak`` measured."""

    requested: int
    completed: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=collections.Counter)

    @property
    def error_count(self) -> int:
        """Every failed session."""
        return sum(self.errors.values())

    @property
    def sessions_per_s(self) -> float:
        """Completed sessions per second of the phase."""
        return self.completed / self.seconds if self.seconds else 0.0


async def _short_session(url: str, model: str, generate_tokens: int, timeout: float) -> None:
    """Connect, open a session, one generate of ``generate_tokens`` tokens in one reply, close."""
    connection = await _open_session(url, model, PROMPT_TOKEN_ALLOWANCE + generate_tokens, timeout)
    try:
        await _send(connection, {"type": "generate", "inputs": SOAK_INPUTS, "max_new_tokens": generate_tokens})
        reply = await _receive(connection, timeout)
        if not reply["stop"] or not 1 <= reply["token_count"] <= generate_tokens:
            raise ClientError(f"unexpected reply to a one-reply generate: {reply}")
    finally:
        connection.close()


async def run_soak(url: str, model: str, sessions: int, concurrency: int, generate_tokens: int = 2,
                   reply_timeout: float = 60.0, time_limit: float = float("inf")) -> SoakResult:
    """Opens and closes ``sessions`` short sessions, ``concurrency`` at a time.

    No new session starts after ``time_limit`` seconds; ``completed`` says how many ran.
    """
    result = SoakResult(requested=sessions)
    started = time.monotonic()
    remaining = iter(range(sessions))  # shared: each worker takes the next session number

    async def worker() -> None:
        for _ in remaining:
            if time.monotonic() - started > time_limit:
                return
            try:
                await _short_session(url, model, generate_tokens, reply_timeout)
            except Exception as error:
                result.errors[_describe(error)] += 1
            else:
                result.completed += 1

    await asyncio.gather(*(worker() for _ in range(min(concurrency, sessions))))
    result.seconds = time.monotonic() - started
    return result


@dataclass(frozen=True)
class ProcessSample:
    """A process's resident memory, threads and open file descriptors at one moment."""

    rss_bytes: int
    threads: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> "ProcessSample":
        """The figures of process ``pid`` now."""
        process = psutil.Process(pid)
        return cls(rss_bytes=process.memory_info().rss, threads=process.num_threads(), fds=process.num_fds())


async def scrape_open_sessions(base_url: str) -> int:
    """The ``swarm_chat_open_sessions`` gauge from ``base_url``'s ``/metrics``."""
    response = await tornado.httpclient.AsyncHTTPClient().fetch(base_url.rstrip("/") + "/metrics")
    for family in text_string_to_metric_families(response.body.decode()):
        if family.name == OPEN_SESSIONS_METRIC:
            return int(family.samples[0].value)
    raise ClientError(f"{OPEN_SESSIONS_METRIC} is missing from /metrics")


async def wait_for_no_open_sessions(read_open_sessions: Callable[[], Awaitable[int]], timeout: float) -> int:
    """Polls until no session is open (closes are released in the background) or ``timeout``;
    returns the last count."""
    deadline = time.monotonic() + timeout
    while True:
        count = await read_open_sessions()
        if count == 0 or time.monotonic() >= deadline:
            return count
        await asyncio.sleep(0.1)
