"""Errors the session side reports to clients; handlers map them to replies.

Each has a stable ``code`` and a ``retryable`` flag. Messages keep the phrases existing
clients match on: "Maximum length exceeded", "Session ... expired", "attention cache is full".
"""

from typing import Iterable


class SessionError(Exception):
    """Base of every error the session manager reports to a client."""

    code = "internal_error"
    retryable = False


class InvalidRequest(SessionError):
    """The request is well-formed but asks for something this server cannot do."""

    code = "invalid_request"


class UnknownModel(SessionError):
    """The client named a model this server does not serve."""

    code = "unknown_model"

    def __init__(self, name: object, known: Iterable[str]):
        super().__init__(f"Unknown model {name!r}; this server serves: {', '.join(known)}")


class NotReady(SessionError):
    """The server is still connecting to the swarm or loading models."""

    code = "not_ready"
    retryable = True


class SessionStateError(SessionError):
    """The request does not fit the connection's state (no session yet, or one already open)."""

    code = "bad_state"


class MaxLengthExceeded(SessionError):
    """The session has no room for more tokens; the client may reopen with a longer one."""

    code = "max_length_exceeded"


class SessionExpired(SessionError):
    """The session was closed (idle too long, or broken by an error); open a new one."""

    code = "session_expired"
    retryable = True


class CacheFull(SessionError):
    """The swarm has no room for this session's attention caches."""

    code = "cache_full"
    retryable = True


class StepTimeout(SessionError):
    """A generation step took longer than the configured step timeout."""

    code = "step_timeout"
    retryable = True


class SwarmError(SessionError):
    """The swarm failed to run a step (no route, peer failure, ...)."""

    code = "swarm_error"
    retryable = True


def from_petals_error(error: BaseException) -> SessionError:
    """The client-facing error for an exception raised by petals while running a step."""
    text = str(error) or type(error).__name__
    if isinstance(error, SessionError):
        return error
    if "Maximum length exceeded" in text:
        return MaxLengthExceeded(text)
    if "AllocationFailed" in text or "Could not allocate" in text:
        return CacheFull(f"The swarm's attention cache is full, try again later ({text})")
    return SwarmError(f"The swarm could not run the step: {text}")
