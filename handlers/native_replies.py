"""Every reply of the native APIs, declared once: the WebSocket API's (``/api/v2/generate``),
the HTTP API's (``/api/v1/generate``, ``/api/v1/models``) and the health checks'.

Each reply is a small frozen dataclass; ``body()`` gives its JSON object. Fields that are None
are left out, so a reply carries only what applies to it (``text`` when the client asked for
visible text, ``route`` when it asked for the route, ``id`` when its request had one). A
WebSocket request may carry an ``id`` (a string or an integer); every reply to it echoes it,
so a client can tell which request an error answers while a stream runs.
"""

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from sessions.accounts.limits import Account, format_reset
from sessions.errors import error_payload
from sessions.requests import GenerationUpdate

RequestId = Union[str, int, None]


@dataclass(frozen=True)
class NativeReply:
    """What every native reply has: ``ok``, and the ``id`` of the request it answers."""

    id: RequestId = dataclasses.field(default=None, kw_only=True)
    ok = True  # a reply that succeeded; a readiness check that finds the server not ready says false

    def body(self) -> Dict[str, Any]:
        """The reply as a JSON object (None fields left out)."""
        return {name: value for name, value in self._fields() if value is not None}

    def _fields(self):
        yield "ok", self.ok
        for field in dataclasses.fields(self):
            if field.name != "id":
                yield field.name, getattr(self, field.name)
        yield "id", self.id

    def frame(self) -> str:
        """The reply as a WebSocket text frame."""
        return json.dumps(self.body())


@dataclass(frozen=True)
class Done(NativeReply):
    """A request that needs no more than "done": ``{"ok": true}``."""


@dataclass(frozen=True)
class SessionOpened(NativeReply):
    """A resumable session was opened: its id and the token that resumes it."""

    session_id: str
    resume_token: str


@dataclass(frozen=True)
class Queued(NativeReply):
    """A session being opened waits for room on a full server: its place in line (1: next).
    The open's own reply follows once it is admitted (or refused)."""

    queued: bool
    position: int


@dataclass(frozen=True)
class SessionResumed(NativeReply):
    """A session was resumed; the replies after the client's ``last_seq`` follow, up to ``latest_seq``."""

    session_id: str
    resumed: bool
    latest_seq: int


@dataclass(frozen=True)
class StreamedReply(NativeReply):
    """One reply of a WebSocket generation: its new text; ``stop`` on the last one."""

    outputs: str
    stop: bool
    token_count: int
    text: Optional[str] = None  # the visible text, when the client asked for it
    route: Optional[Dict[str, Any]] = None  # on the last reply, when the client asked
    session_length: Optional[int] = None  # on the last reply: tokens in the session's conversation

    def _fields(self):
        # Written out: this runs for every streamed token.
        yield "ok", True
        yield "outputs", self.outputs
        yield "stop", self.stop
        yield "token_count", self.token_count
        yield "text", self.text
        yield "route", self.route
        yield "session_length", self.session_length
        yield "id", self.id

    @classmethod
    def of(cls, update: GenerationUpdate, visible_text: bool = False, request_id: RequestId = None) -> "StreamedReply":
        """The reply carrying one generation update."""
        return cls(update.outputs, update.last, update.token_count, update.text if visible_text else None,
                   update.route, update.session_length, id=request_id)


@dataclass(frozen=True)
class Health(NativeReply):
    """``GET /health``: the process answers."""

    status: str
    open_sessions: int


@dataclass(frozen=True)
class Readiness(NativeReply):
    """``GET /ready``: whether every model can run now, each model's route, and the executor's
    load (``traceback`` says why not, when the swarm could not be asked)."""

    ready: bool
    models: List[Dict[str, Any]]
    traceback: Optional[str] = None
    executor: Optional[Dict[str, Any]] = None
    checked_in_ms: Optional[float] = None

    @property
    def ok(self) -> bool:  # type: ignore[override]
        return self.ready


@dataclass(frozen=True)
class AccountUsage(NativeReply):
    """``GET /api/v1/usage``: the caller's account, its limits (None: no limit of that kind), what
    is left of them, when the rates are full again, and what it used today, per model."""

    account: str
    limits: Dict[str, Any]
    remaining: Dict[str, Any]
    reset: Dict[str, Any]
    today: Dict[str, Any]

    @classmethod
    def of(cls, account: Account, sessions: int) -> "AccountUsage":
        """The reply about ``account``, which may hold ``sessions`` sessions at once."""
        limits = account.limits
        used_today = account.used_today  # moves the account on to a new day first
        remaining: Dict[str, Any] = {"daily_tokens": account.daily_remaining}
        reset: Dict[str, Any] = {}
        for kind, rate in (("requests_per_minute", account.requests), ("tokens_per_minute", account.tokens)):
            remaining[kind] = rate.remaining if rate is not None else None
            reset[kind] = format_reset(rate.reset_seconds) if rate is not None else None
        models = [dict(model=model, requests=counts.requests, prompt_tokens=counts.prompt_tokens,
                       cached_tokens=counts.cached_tokens, completion_tokens=counts.completion_tokens,
                       total_tokens=counts.total_tokens) for model, counts in sorted(account.today.items())]
        return cls(account.name,
                   {"requests_per_minute": limits.requests_per_minute or None,
                    "tokens_per_minute": limits.tokens_per_minute or None, "sessions": sessions,
                    "daily_tokens": limits.daily_tokens or None, "models": list(limits.models) or None,
                    "weight": limits.weight},
                   remaining, reset,
                   {"day": account.day, "total_tokens": used_today, "models": models})


@dataclass(frozen=True)
class DeclaredModels(NativeReply):
    """``GET /api/v1/models``: every declared model (``handlers.models`` describes each)."""

    models: List[Dict[str, Any]]


@dataclass(frozen=True)
class GenerateResult(NativeReply):
    """The HTTP API's reply: the whole generated text."""

    outputs: str
    route: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class ErrorReply:
    """A refused or failed request: ``{"ok": false, "traceback": message, "code", "retryable"}``."""

    error: BaseException
    debug: bool = False  # the message carries the traceback
    id: RequestId = None

    def body(self) -> Dict[str, Any]:
        """The reply as a JSON object."""
        body = error_payload(self.error, "native", self.debug)
        if self.id is not None:
            body["id"] = self.id
        return body

    def frame(self) -> str:
        """The reply as a WebSocket text frame."""
        return json.dumps(self.body())


def cancelled_with_nothing_running(request_id: RequestId = None) -> StreamedReply:
    """The answer to ``stop`` when no generation runs: a last reply with no text, so a client
    waiting for ``stop: true`` is not left waiting."""
    return StreamedReply("", True, 0, id=request_id)
