"""The base of every JSON endpoint: collaborators from ``initialize``, errors as JSON."""

import json
import logging
import traceback
import uuid
from typing import Any, Dict, Optional

import tornado.web

from handlers.protocol import ProtocolError
from sessions.errors import SessionError
from sessions.manager import SessionManager

logger = logging.getLogger(__name__)

# HTTP status for each error code: a client over its own limit gets 429, and retryable
# failures of the server or the swarm get 503; both come with Retry-After.
STATUS_BY_CODE = {
    "bad_request": 400,
    "invalid_request": 400,
    "max_length_exceeded": 400,
    "unknown_model": 404,
    "bad_state": 409,
    "session_expired": 409,
    "too_many_sessions": 429,
    "not_ready": 503,
    "server_busy": 503,
    "cache_full": 503,
    "step_timeout": 503,
    "missing_blocks": 503,
    "peer_failure": 503,
    "swarm_error": 503,
}
RETRY_AFTER_SECONDS = 1


class APIHandler(tornado.web.RequestHandler):
    """Answers JSON; every error, ours or Tornado's, becomes ``{"ok": false, "traceback": ...}``."""

    def initialize(self, manager: SessionManager) -> None:
        self.manager = manager

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")

    def json_body(self) -> Dict[str, Any]:
        """The request body as a JSON object."""
        try:
            body = json.loads(self.request.body or b"")
        except ValueError as error:
            raise ProtocolError(f"Body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ProtocolError("Body must be a JSON object")
        return body

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, (ProtocolError, SessionError)):
            logger.info("%s %s: %s", self.request.method, self.request.uri, value)  # the client's problem
        else:
            super().log_exception(typ, value, tb)

    def error_status(self, error: Optional[BaseException], default: int) -> int:
        """The HTTP status for ``error`` (Tornado's own errors keep theirs)."""
        if isinstance(error, (ProtocolError, SessionError)):
            return STATUS_BY_CODE.get(error.code, 500)
        return default

    def error_body(self, message: str, error: Optional[BaseException]) -> Dict[str, Any]:
        """The JSON body of an error reply."""
        body: Dict[str, Any] = {"ok": False, "traceback": message}
        if isinstance(error, (ProtocolError, SessionError)):
            body.update(code=error.code, retryable=error.retryable)
        return body

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        error: Optional[BaseException] = exc_info[1] if exc_info else None
        status = self.error_status(error, status_code)
        self.set_status(status)
        self.manager.metrics.count_error(error.code if isinstance(error, (ProtocolError, SessionError))
                                         else f"http_{status}")
        if status in (429, 503):
            self.set_header("Retry-After", str(RETRY_AFTER_SECONDS))
        if isinstance(error, tornado.web.HTTPError):
            message = error.log_message % error.args if error.log_message else self._reason
        elif isinstance(error, (ProtocolError, SessionError)):
            message = str(error)
        else:
            message = self._reason
        if self.settings.get("serve_traceback") and exc_info:
            message += "\n" + "".join(traceback.format_exception(*exc_info))
        self.finish(self.error_body(message, error))


class GenerationHandler(APIHandler):
    """A request that runs a generation in a session of its own, stopped if the client leaves."""

    connection_prefix = "http-"

    def prepare(self) -> None:
        self.connection_id = self.connection_prefix + uuid.uuid4().hex[:8]

    def on_connection_close(self) -> None:
        # The client went away mid-request: stop generating for nobody.
        self.manager.close_connection(self.connection_id, "client disconnected")
