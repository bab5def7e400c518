"""Log lines that carry the connection they belong to."""

import logging
import secrets


def new_connection_id(prefix: str = "") -> str:
    """A connection's id: 128 random bits, so that nobody can guess another client's."""
    return prefix + secrets.token_hex(16)


class ConnectionLog(logging.LoggerAdapter):
    """A logger that puts ``[connection id]`` in front of every line."""

    def __init__(self, logger: logging.Logger, connection_id: str):
        super().__init__(logger, {"connection_id": connection_id})

    def process(self, msg, kwargs):
        return f"[{self.extra['connection_id']}] {msg}", kwargs
