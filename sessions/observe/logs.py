"""Log lines that carry the connection they belong to."""

import logging
import secrets


def new_connection_id(prefix: str = "") -> str:
    """A connection's id (a WebSocket or an HTTP request): 128 random bits, so that nobody can
    guess another client's."""
    return prefix + secrets.token_hex(16)


def new_session_id() -> str:
    """An inference session's id, which outlives the connection that opened it (a resumed or a
    warm session serves another): 128 random bits, as it names a session to resume."""
    return "session-" + secrets.token_hex(16)


class ConnectionLog(logging.LoggerAdapter):
    """A logger that puts ``[connection id]`` (and the session's, for a session's lines) in front
    of every line."""

    def __init__(self, logger: logging.Logger, connection_id: str, session_id: str = ""):
        super().__init__(logger, {"connection_id": connection_id, "session_id": session_id})

    def process(self, msg, kwargs):
        session = f" {self.extra['session_id']}" if self.extra["session_id"] else ""
        return f"[{self.extra['connection_id']}{session}] {msg}", kwargs
