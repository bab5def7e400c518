"""Every error a client can be answered with, and the one mapping from an exception to a reply.

Each error class declares, once, everything about its code: the HTTP status, whether a retry
may help, whether the client's session survives it, the OpenAI error type and the log level.
``ERROR_CLASSES`` is the table of them all (docs/api.md's error table is tested against it).
``classify`` turns any exception into one of these errors, and ``error_payload`` turns that
into the wire body of the WebSocket, JSON, OpenAI or Anthropic API. Nothing here imports Tornado.
"""

import logging
import math
import re
import traceback
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type

LOGGED_MESSAGE_CHARS = 500


class ServiceError(Exception):
    """Base of every error reported to a client; unexpected exceptions become ``InternalError``."""

    code: str  # declared by each concrete error
    status = 500  # HTTP status of a JSON or OpenAI reply
    retryable = False  # whether the same request may succeed later
    session_survives = False  # whether the client's inference session is still usable afterwards
    openai_type = "server_error"
    log_level = logging.ERROR
    meaning: str  # one line for the error table of docs/api.md
    param: Optional[str] = None  # the request field at fault, when there is one (OpenAI's ``param``)
    openai_code: Optional[str] = None  # OpenAI's ``code``; the error's own code when None
    retry_after: Optional[float] = None  # seconds after which a retry may succeed, when known

    def __init__(self, message: str, param: Optional[str] = None, retry_after: Optional[float] = None):
        super().__init__(message)
        if param is not None:
            self.param = param
        if retry_after is not None:
            self.retry_after = retry_after


class ClientError(ServiceError):
    """The request cannot be served as sent; the session (if any) is untouched."""

    status = 400
    session_survives = True
    openai_type = "invalid_request_error"
    log_level = logging.INFO


class BadRequest(ClientError):
    """A malformed request: bad JSON, unknown type, missing or ill-typed field."""

    code = "bad_request"
    meaning = "malformed message: bad JSON, unknown type, a field of the wrong type or range"


class InvalidRequest(ClientError):
    """The request is well-formed but asks for something this server cannot do."""

    code = "invalid_request"
    meaning = "well-formed but not possible, e.g. `max_new_tokens` over the model's limit"


class MaxLengthExceeded(ClientError):
    """The session has no room for more tokens; the client may reopen with a longer one."""

    code = "max_length_exceeded"
    meaning = "the session is full; reopen with a larger `max_length`"


class Unauthorized(ClientError):
    """The API key is missing or wrong."""

    code = "unauthorized"
    status = 401
    openai_type = "authentication_error"
    openai_code = "invalid_api_key"
    meaning = "`--api-key` is set and the request did not bring it"


class PayloadTooLarge(ClientError):
    """The request body is larger than the server accepts; it was refused unread."""

    code = "payload_too_large"
    status = 413
    meaning = "the request body is over `--max-body-bytes`; it is refused before it is read"


class ModelNotPublic(ClientError):
    """The model is declared ``public_api: false``: only the server's own chat page may use it."""

    code = "model_not_public"
    status = 403
    openai_type = "permission_error"
    meaning = "the model is served to this server's own chat page only"


class ModelNotAllowed(ClientError):
    """The client's API key may not use this model."""

    code = "model_not_allowed"
    status = 403
    openai_type = "permission_error"
    meaning = "the API key's allowed models do not include this one"


class UnknownModel(ClientError):
    """The client named a model this server does not serve."""

    code = "unknown_model"
    status = 404
    param = "model"
    openai_code = "model_not_found"
    meaning = "no such model; the message lists the served ones"

    def __init__(self, name: object, known: Iterable[str]):
        super().__init__(f"Unknown model {name!r}; this server serves: {', '.join(known)}")


class UnknownResponse(ClientError):
    """The client named a stored response it has none of."""

    code = "response_not_found"
    status = 404
    openai_code = "not_found"
    meaning = "no stored response of this client by that id: never stored, deleted, expired, or another client's"


class ModelUnavailable(ClientError):
    """The client named a declared model that start-up refused (a family or config it cannot serve)."""

    code = "model_unavailable"
    param = "model"
    meaning = "the model is declared but cannot be served; the message says why"


class SessionStateError(ClientError):
    """The request does not fit the connection's state (no session yet, or one already open)."""

    code = "bad_state"
    status = 409
    meaning = "e.g. `generate` before `open_inference_session`"


class SessionExpired(ClientError):
    """The session was closed (idle too long, or broken by an error); open a new one."""

    code = "session_expired"
    status = 409
    retryable = True
    session_survives = False
    meaning = "the session was closed (idle, or broken by an error); open a new one"


class ResumeRefused(ClientError):
    """No resumable session has this id and resume token (or it waited too long); open a new one."""

    code = "resume_refused"
    status = 404
    session_survives = False
    meaning = "no resumable session with this id and token (gone, or its grace period is over)"


class ClientLimit(ClientError):
    """This client holds as many sessions as one client may."""

    code = "too_many_sessions"
    status = 429
    retryable = True
    openai_type = "rate_limit_error"
    meaning = "this client address holds its maximum of sessions"


class TooManyRequests(ClientError):
    """This client has as many requests in flight on the HTTP APIs as one client may."""

    code = "too_many_requests"
    status = 429
    retryable = True
    openai_type = "rate_limit_error"
    meaning = "the client has its maximum of HTTP generation requests in flight; its body was not read"


class TooManyConnections(ClientError):
    """This server, or this client, holds as many WebSocket connections as allowed."""

    code = "too_many_connections"
    status = 429
    retryable = True
    openai_type = "rate_limit_error"
    meaning = "the client (or the server in all) holds its maximum of WebSocket connections"


class RateLimited(ClientError):
    """The client's requests or tokens per minute are spent for now."""

    code = "rate_limited"
    status = 429
    retryable = True
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"
    meaning = "the key's (or anonymous address's) requests or tokens per minute are spent; `retry_after` says when"


class QuotaExceeded(ClientError):
    """The client's daily token budget is spent (or too little of it is left for the prompt)."""

    code = "quota_exceeded"
    status = 429
    retryable = True
    openai_type = "insufficient_quota"
    openai_code = "insufficient_quota"
    meaning = "the key's daily token budget is spent, or too little is left for the prompt; it restarts at 00:00 UTC"


class QueueFull(ClientError):
    """The session already has as many generations running and waiting as one session may."""

    code = "queue_full"
    status = 429
    retryable = True
    openai_type = "rate_limit_error"
    meaning = "the session already runs one generation and holds the most waiting ones; wait for a reply"


class Unavailable(ServiceError):
    """The server or the swarm cannot serve the request now; a later try may work."""

    status = 503
    retryable = True
    log_level = logging.WARNING


class ServerBusy(Unavailable):
    """This server holds as many sessions as it is configured to, or as many schema compiles wait."""

    code = "server_busy"
    session_survives = True
    log_level = logging.INFO
    meaning = "the server holds its maximum of sessions, or of JSON schemas waiting to be compiled"


class MemoryBudgetExceeded(Unavailable):
    """The sessions' client-side state would outgrow ``--session-memory-budget-mib``."""

    code = "memory_budget_exceeded"
    session_survives = True
    log_level = logging.WARNING
    meaning = "open sessions hold the server's memory budget for session state (`--session-memory-budget-mib`)"


class NotReady(Unavailable):
    """The server is still connecting to the swarm or loading models."""

    code = "not_ready"
    session_survives = True
    meaning = "still connecting to the swarm"


class SwarmError(Unavailable):
    """The swarm failed to run a step for a reason none of its subclasses names."""

    code = "swarm_error"
    meaning = "any other failure inside the swarm"


class MissingBlocks(SwarmError):
    """No server in the swarm holds some blocks of the model: there is no full route."""

    code = "missing_blocks"
    meaning = "no online server holds some blocks; the message names them, e.g. `blocks 2-3 of org/model`"

    def __init__(self, blocks: Sequence[int], model: str):
        self.blocks = sorted(blocks)
        super().__init__(f"No server in the swarm holds blocks {describe_blocks(self.blocks)} of {model}; "
                         "it cannot run until a server hosting them joins")


class PeerFailure(SwarmError):
    """A server of the route failed or stopped answering, and retrying did not find another."""

    code = "peer_failure"
    meaning = "a server on the route failed and no other could take over"


class CacheFull(SwarmError):
    """The swarm has no room for this session's attention caches."""

    code = "cache_full"
    meaning = "the swarm has no room for this session's attention caches (out of capacity)"


class StepTimeout(SwarmError):
    """A generation step took longer than the configured step timeout."""

    code = "step_timeout"
    meaning = "a step took longer than `--step-timeout`"


class HTTPStatusError(ServiceError):
    """An HTTP-level refusal by the web framework (no such endpoint, method not allowed)."""

    openai_type = "invalid_request_error"
    log_level = logging.INFO
    session_survives = True

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.code = f"http_{status}"
        if status >= 500:
            self.openai_type, self.log_level = "server_error", logging.ERROR


class InternalError(ServiceError):
    """A bug or an unforeseen failure in this server; the message names only the exception type."""

    code = "internal_error"
    meaning = "an unexpected failure inside this server; the message names only the exception's type"


def _concrete(base: Type[ServiceError]) -> List[Type[ServiceError]]:
    found = []
    for subclass in base.__subclasses__():
        if subclass is not HTTPStatusError:
            if "code" in vars(subclass):
                found.append(subclass)
            found.extend(_concrete(subclass))
    return found


# Every error code a client can receive, with its status and flags: the one table.
ERROR_CLASSES: Tuple[Type[ServiceError], ...] = tuple(_concrete(ServiceError))


def classify(error: BaseException) -> ServiceError:
    """The client-facing error for any exception; unexpected ones hide their details."""
    if isinstance(error, ServiceError):
        return error
    internal = InternalError(f"Internal error: {type(error).__name__}")
    internal.__cause__ = error
    return internal


def log_error(logger: logging.Logger, context: str, error: BaseException) -> ServiceError:
    """Logs ``error`` at its class's level (a traceback for internal errors); returns it classified."""
    classified = classify(error)
    exc_info = error if isinstance(classified, InternalError) else None
    message = str(error)
    if len(message) > LOGGED_MESSAGE_CHARS:  # a message may quote what a client sent
        message = message[:LOGGED_MESSAGE_CHARS] + f"... ({len(message)} characters)"
    logger.log(classified.log_level, "%s: %s", context, message, exc_info=exc_info)
    return classified


# Anthropic's error type for each HTTP status this server answers with; any other is a 4xx
# "invalid_request_error" or a 5xx "api_error". Anthropic says "overloaded_error" for what it
# answers with 529, and this server with 503.
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error"}


def anthropic_type(status: int) -> str:
    """Anthropic's ``error.type`` for an error answered with HTTP ``status``."""
    return ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_payload(error: BaseException, api: str = "native", debug: bool = False) -> Dict[str, Any]:
    """The wire body of an error: ``api`` "native" (WebSocket and JSON), "openai" (JSON and SSE)
    or "anthropic" (``/v1/messages``: JSON and SSE).

    With ``debug`` the message carries the traceback (of the original exception for internal errors).
    """
    classified = classify(error)
    message = str(classified)
    if debug:
        original = classified.__cause__ if isinstance(classified, InternalError) else classified
        if original is not None and original.__traceback__ is not None:
            message += "\n" + "".join(traceback.format_exception(original))
    if api == "openai":
        return {"error": {"message": message, "type": classified.openai_type, "param": classified.param,
                          "code": classified.openai_code or classified.code}}
    if api == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type(classified.status), "message": message}}
    payload = {"ok": False, "traceback": message, "code": classified.code, "retryable": classified.retryable}
    if classified.retry_after is not None:
        payload["retry_after"] = math.ceil(classified.retry_after)
    return payload


def describe_blocks(blocks: Sequence[int]) -> str:
    """Block indices as ranges, e.g. ``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    ranges: List[List[int]] = []
    for block in sorted(blocks):
        if ranges and block == ranges[-1][1] + 1:
            ranges[-1][1] = block
        else:
            ranges.append([block, block])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in ranges)


# petals' MissingBlocksError says "No servers holding blocks [2, 3] are online" (or "blocks 0").
_MISSING_BLOCKS = re.compile(r"No servers holding blocks \[?([\d, ]+)\]? are online")
# What a dead or unreachable peer looks like from hivemind's p2p layer.
_PEER_FAILURE_MARKERS = ("P2PDaemonError", "P2PHandlerError", "ControlFailure", "failed to dial",
                         "Connection reset", "Connection lost", "connection closed", "failed to connect",
                         "Broken pipe", "stream reset", "TimeoutError")


class SwarmCallFailed(Exception):
    """Raised by a step when the swarm's part of it (petals and the network behind it) failed;
    its ``__cause__`` is petals' exception. Any other exception in a step is this server's own
    failure, and is reported as an internal error."""


def from_petals_error(error: BaseException, model: str) -> ServiceError:
    """The client-facing error for an exception petals raised while running a step of ``model``."""
    if isinstance(error, ServiceError):
        return error
    text = f"{type(error).__name__}: {error}"
    missing = _MISSING_BLOCKS.search(text)
    if missing:
        return MissingBlocks([int(block) for block in missing.group(1).replace(",", " ").split()], model)
    if "Maximum length exceeded" in text:
        return MaxLengthExceeded(str(error))
    if "AllocationFailed" in text or "Could not allocate" in text:
        return CacheFull(f"The swarm's attention cache is full, try again later ({error})")
    if any(marker.lower() in text.lower() for marker in _PEER_FAILURE_MARKERS):
        return PeerFailure(f"A server of the swarm failed and no other could take over: {text}")
    return SwarmError(f"The swarm could not run the step: {text}")
