"""The base of every JSON endpoint: its context from the application (``ServerContext``), every
error as JSON."""

import asyncio
import json
import logging
import math
from typing import Any, AsyncIterator, Dict, Optional

import tornado.httputil
import tornado.web

from handlers.context import ServerContext
from sessions.accounts.book import Caller
from sessions.errors import (
    BadRequest,
    HTTPStatusError,
    PayloadTooLarge,
    ServiceError,
    classify,
    error_payload,
)
from sessions.models import LoadedModel
from sessions.observe.logs import new_connection_id
from sessions.requests import GenerationRequest, GenerationUpdate
from sessions.serving.admission import Slot
from sessions.serving.session import ChatSession

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


def as_service_error(error: Optional[BaseException], status: int, reason: str) -> ServiceError:
    """The error a reply reports: ours as it is, Tornado's by its status, anything else as internal."""
    if isinstance(error, tornado.web.HTTPError):
        return HTTPStatusError(error.status_code, error.log_message % error.args if error.log_message else reason)
    if error is None:
        return HTTPStatusError(status, reason)
    return classify(error)


class JSONErrors(ServerContext):
    """Mixed into a handler: every error, ours or Tornado's, becomes the API's
    JSON error body, counted in the metrics.

    ``api`` picks the error body: "native" (``{"ok": false, "traceback": ...}``), "openai" or
    "anthropic" (``sessions.errors.error_payload``).
    """

    api = "native"

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, ServiceError):
            logger.log(value.log_level, "%s %s: %s", self.request.method, self.request.uri, value)
        else:
            super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        error = as_service_error(exc_info[1] if exc_info else None, status_code, self._reason)
        self.set_status(error.status)
        self.manager.metrics.count_error(error.code)
        if error.status in (429, 503):
            self.set_header("Retry-After", str(math.ceil(error.retry_after or RETRY_AFTER_SECONDS)))
        elif error.status == 401:
            self.set_header("WWW-Authenticate", "Bearer")
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(error_payload(error, self.api, debug=self.config.debug))


class APIHandler(JSONErrors, tornado.web.RequestHandler):
    """Answers JSON, errors included (``JSONErrors``).

    A handler with ``requires_api_key`` identifies its ``caller`` first: 401 for a key the
    server does not know, or for none where keys are required (``sessions.accounts.book``).
    """

    requires_api_key = False
    caller: Optional[Caller] = None  # who the request is, once known

    def prepare(self) -> None:
        # A browser's CORS preflight never carries credentials; it only asks what is allowed.
        if self.requires_api_key and self.request.method != "OPTIONS":
            self.caller = self.request_caller()

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")

    def json_body(self) -> Dict[str, Any]:
        """The request body as a JSON object."""
        try:
            body = json.loads(self.request.body or b"")
        except (ValueError, RecursionError) as error:  # RecursionError: nested too deeply
            raise BadRequest(f"Body is not valid JSON: {type(error).__name__}: {error}") from None
        if not isinstance(body, dict):
            raise BadRequest("Body must be a JSON object")
        return body

@tornado.web.stream_request_body
class GenerationHandler(APIHandler):
    """A request that runs one generation in a session of its own, closed if the client leaves.

    The body is read only when its announced length is within ``--max-body-bytes`` (413 otherwise),
    and never past it, and only while the client has fewer requests in flight than it may (429
    otherwise): the request's place is taken before anything is read or tokenized, and given back
    once the reply is written. A client refused (4xx) more often than ``REFUSALS_PER_SECOND``
    has its next requests wait their turn at that pace before they are read.
    """

    connection_prefix = "http-"
    requires_api_key = True
    shows_rate_limits = False  # whether replies carry OpenAI's x-ratelimit-* headers

    def initialize(self) -> None:
        self.max_body_bytes = self.config.max_body_bytes
        self._request_slot: Optional[Slot] = None  # the request's place among its client's requests in flight
        self._body = bytearray()
        self._body_parsed = False  # the handler method has taken the whole body
        self.client: Optional[str] = None
        self.client_left = False
        self.session: Optional[ChatSession] = None
        self._opening: Optional[asyncio.Future] = None  # the session being opened (maybe waiting for room)
        self.cached_tokens = 0

    async def _take_turn_if_often_refused(self) -> None:
        """Waits, before anything is read, while the client is refused more often than allowed:
        a flood of requests that would be refused is read at the pace of a polite client."""
        admission = self.manager.admission
        wait = admission.refusal_wait(self.client)
        if wait is None:  # it already has the most requests waiting: not even read
            self.request.connection.close()
            raise tornado.web.Finish()
        if wait:
            slot = admission.slowed(self.client)
            try:
                await asyncio.sleep(wait)
            finally:
                slot.release()
            if self.client_left:
                raise tornado.web.Finish()

    def set_rate_limit_headers(self) -> None:
        """The caller's limits per minute and what is left of them, as OpenAI's headers say it."""
        if self.shows_rate_limits and self.caller is not None:
            for name, value in self.caller.account.rate_headers().items():
                self.set_header(name, value)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_rate_limit_headers()
        super().write_error(status_code, **kwargs)
        if 400 <= self.get_status() < 500 and self.client is not None:
            self.manager.admission.refused(self.client)  # its next requests may have to wait their turn

    async def prepare(self) -> None:
        self.connection_id = new_connection_id(self.connection_prefix)
        self.client = self.request_address()  # refusals count against the address until the key is known
        await self._take_turn_if_often_refused()
        super().prepare()
        if self.caller is not None:
            self.client = self.caller.client  # whose limits it counts against
        if self.request.method in ("POST", "PUT", "PATCH"):
            self._request_slot = self.manager.admission.admit_request(self.client)
            self.caller.account.take_request()
            self.set_rate_limit_headers()
        try:
            announced = int(self.request.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if announced > self.max_body_bytes:
            raise PayloadTooLarge(f"The body is {announced} bytes; this server accepts at most {self.max_body_bytes}")
        if self.request.method in ("POST", "PUT", "PATCH"):
            self.request.connection.set_max_body_size(self.max_body_bytes)  # a chunked body stops there

    def on_finish(self) -> None:
        if self._request_slot is not None:
            self._request_slot.release()

    def data_received(self, chunk: bytes) -> None:
        self._body += chunk

    def request_body(self) -> bytes:
        """The whole body, once received; form fields in it are added to the request's arguments."""
        if not self._body_parsed:
            self._body_parsed = True
            self.request.body = bytes(self._body)
            tornado.httputil.parse_body_arguments(self.request.headers.get("Content-Type", ""), self.request.body,
                                                  self.request.body_arguments, self.request.files,
                                                  self.request.headers)
            for name, values in self.request.body_arguments.items():
                self.request.arguments.setdefault(name, []).extend(values)
        return self.request.body

    def json_body(self) -> Dict[str, Any]:
        self.request_body()
        return super().json_body()

    async def generate(self, loaded: LoadedModel, request: GenerationRequest) -> AsyncIterator[GenerationUpdate]:
        """The replies of ``request`` in a session sized for it (or a warm one it continues,
        ``cached_tokens`` saying how many prompt tokens that spared); the session is released or
        kept warm when they end.

        Iterate it inside ``contextlib.aclosing`` so that the session is released at once if the
        caller stops early.
        """
        # Its own task, so that a client that leaves while it waits for room is taken out of the line.
        self._opening = asyncio.ensure_future(self.manager.open_for_request(
            self.connection_id, loaded, request, self.client, on_queued=self.queued))
        try:
            self.session, request, self.cached_tokens = await self._opening
        except asyncio.CancelledError:
            if self.client_left:
                return
            raise
        finally:
            self._opening = None
        ran_to_end = False
        try:
            if self.client_left:  # it left while the prompt was being counted
                return
            async for update in self.session.generate(request):
                ran_to_end = update.last and update.finish_reason != "cancelled"
                yield update
        finally:
            reason = "client disconnected" if self.client_left else "request done"
            self.manager.finish_request(self.session, ran_to_end and not self.client_left, reason)

    def queued(self, position: int) -> None:
        """The request's session waits for room on a full server, ``position`` in line (1: next);
        a reply that can say so before it starts overrides this."""

    def on_connection_close(self) -> None:
        # Tornado's own ends the wait for a body cut off mid-upload (else the handler and the
        # part of the body it holds stay forever).
        super().on_connection_close()
        if not self._body_parsed and self._request_slot is not None:
            self._request_slot.release()  # cut off before its body was whole: the handler never runs
        # The client went away mid-request: stop generating for nobody.
        self.client_left = True
        if self._opening is not None:
            self._opening.cancel()
        if self.session is not None:
            self.session.cancel_generations()
