"""The base of every JSON endpoint: collaborators from ``initialize``, errors as JSON."""

import logging
import traceback
from typing import Any, Optional

import tornado.web

from sessions.errors import SessionError
from sessions.manager import SessionManager

logger = logging.getLogger(__name__)


class APIHandler(tornado.web.RequestHandler):
    """Answers JSON; every error, ours or Tornado's, becomes ``{"ok": false, "traceback": ...}``."""

    def initialize(self, manager: SessionManager) -> None:
        self.manager = manager

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        error: Optional[BaseException] = exc_info[1] if exc_info else None
        if isinstance(error, tornado.web.HTTPError):
            message = error.log_message % error.args if error.log_message else self._reason
        elif isinstance(error, SessionError):
            message = str(error)
        else:
            message = self._reason
        body = {"ok": False, "traceback": message}
        if error is not None and isinstance(error, SessionError):
            body.update(code=error.code, retryable=error.retryable)
        if self.settings.get("serve_traceback") and exc_info:
            body["traceback"] += "\n" + "".join(traceback.format_exception(*exc_info))
        self.finish(body)
