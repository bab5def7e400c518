"""Errors the session side raises; handlers map them to replies by their ``code``."""


class SessionError(Exception):
    """Base of every error the session manager reports to a client."""

    code = "internal_error"
    retryable = False


class UnknownModel(SessionError):
    """The client named a model this server does not serve."""

    code = "unknown_model"

    def __init__(self, name: str, known):
        super().__init__(f"Unknown model {name!r}; this server serves: {', '.join(known)}")


class NotReady(SessionError):
    """The server is still connecting to the swarm or loading models."""

    code = "not_ready"
    retryable = True
