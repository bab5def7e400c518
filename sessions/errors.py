"""Errors the session side reports to clients; handlers map them to replies.

Each has a stable ``code`` and a ``retryable`` flag. Messages keep the phrases existing
clients match on: "Maximum length exceeded", "Session ... expired", "attention cache is full".
"""

import re
from typing import Iterable, List, Sequence


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
    """The swarm failed to run a step for a reason none of the errors below names."""

    code = "swarm_error"
    retryable = True


class MissingBlocks(SwarmError):
    """No server in the swarm holds some blocks of the model: there is no full route."""

    code = "missing_blocks"

    def __init__(self, blocks: Sequence[int], model: str):
        self.blocks = sorted(blocks)
        super().__init__(f"No server in the swarm holds blocks {describe_blocks(self.blocks)} of {model}; "
                         "it cannot run until a server hosting them joins")


class PeerFailure(SwarmError):
    """A server of the route failed or stopped answering, and retrying did not find another."""

    code = "peer_failure"


class ServerBusy(SessionError):
    """This server holds as many sessions as it is configured to."""

    code = "server_busy"
    retryable = True


class ClientLimit(SessionError):
    """This client holds as many sessions as one client may."""

    code = "too_many_sessions"
    retryable = True


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


def from_petals_error(error: BaseException, model: str) -> SessionError:
    """The client-facing error for an exception petals raised while running a step of ``model``."""
    if isinstance(error, SessionError):
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
