"""``/api/v2/generate``: the WebSocket API, one inference session per connection.

The handler parses each message, hands it to the session manager and writes replies;
generations run as the manager's tasks, so a ``stop`` or a disconnect is read while tokens
flow. Closing the connection, cleanly or not, tears the session down.
"""

import json
import traceback
import uuid
from typing import Any, Dict, Optional, Sequence, Set, Union
from urllib.parse import urlparse

import tornado.websocket

from handlers.protocol import GenerateMessage, OpenSessionMessage, ProtocolError, StopMessage, parse_message
from sessions.errors import SessionError
from sessions.manager import SessionManager, connection_log
from sessions.session import GenerationUpdate


def error_reply(error: Union[ProtocolError, SessionError], debug: bool = False) -> Dict[str, Any]:
    """``{"ok": false, "traceback": message}`` plus the error's code and whether a retry may help."""
    message = str(error)
    if debug and error.__traceback__ is not None:
        message += "\n" + "".join(traceback.format_exception(error))
    return {"ok": False, "traceback": message, "code": error.code, "retryable": error.retryable}


def update_reply(update: GenerationUpdate) -> Dict[str, Any]:
    """One generation reply as the wire has it."""
    return {"ok": True, "outputs": update.outputs, "stop": update.stop, "token_count": update.token_count}


class GenerateWebSocket(tornado.websocket.WebSocketHandler):
    """One client connection of the WebSocket API."""

    def initialize(self, manager: SessionManager, allowed_origins: Sequence[str], max_message_bytes: int,
                   open_connections: Set["GenerateWebSocket"]) -> None:
        self.manager = manager
        self.open_connections = open_connections
        self.allowed_origins = tuple(allowed_origins)
        self.max_message_bytes = max_message_bytes
        self.connection_id = uuid.uuid4().hex[:8]
        self.log = connection_log(self.connection_id)

    def check_origin(self, origin: str) -> bool:
        # The API is public by default, like the original service; an allow-list narrows it.
        return not self.allowed_origins or origin in self.allowed_origins or self._same_origin(origin)

    def _same_origin(self, origin: Optional[str]) -> bool:
        return bool(origin) and urlparse(origin).netloc.lower() == self.request.host.lower()

    def open(self) -> None:
        # Replies are small and streamed token by token: Nagle's algorithm would hold each
        # one back until the previous is acknowledged (up to the peer's delayed-ACK time).
        self.set_nodelay(True)
        self.open_connections.add(self)
        self.log.info("Connected from %s (origin %s)", self.request.remote_ip, self.request.headers.get("Origin"))

    async def on_message(self, message: Union[str, bytes]) -> None:
        try:
            parsed = parse_message(message, self.max_message_bytes)
            if isinstance(parsed, OpenSessionMessage):
                await self._open_session(parsed)
            elif isinstance(parsed, GenerateMessage):
                self.manager.start_generation(self.connection_id, parsed.request, self.send_reply)
            elif isinstance(parsed, StopMessage) and not self.manager.stop_generation(self.connection_id):
                await self.send_reply(GenerationUpdate(outputs="", stop=True, token_count=0))
        except (ProtocolError, SessionError) as error:
            self.log.info("Rejected a message: %s", error)
            await self.send_reply(error)

    async def _open_session(self, message: OpenSessionMessage) -> None:
        loaded = self.manager.find_model(message.model)
        if not loaded.spec.public_api and not self._same_origin(self.request.headers.get("Origin")):
            raise ProtocolError(f"Model {loaded.spec.key!r} is only served to this server's own chat page")
        await self.manager.open_session(self.connection_id, loaded.spec.key, message.max_length,
                                        self.request.remote_ip)
        await self.send_reply(None)

    async def send_reply(self, reply: Union[None, GenerationUpdate, ProtocolError, SessionError]) -> None:
        """Writes ``{"ok": true}``, a generation update or an error; a closed socket drops it."""
        if reply is None:
            body: Dict[str, Any] = {"ok": True}
        elif isinstance(reply, GenerationUpdate):
            body = update_reply(reply)
        else:
            self.manager.metrics.count_error(reply.code)
            body = error_reply(reply, debug=self.settings.get("serve_traceback", False))
        try:
            await self.write_message(json.dumps(body))
        except tornado.websocket.WebSocketClosedError:
            self.log.debug("Reply dropped: the connection is closed")

    def on_close(self) -> None:
        self.open_connections.discard(self)
        self.log.info("Disconnected (code %s)", self.close_code)
        self.manager.close_connection(self.connection_id)
