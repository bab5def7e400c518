"""``/api/v2/generate``: the WebSocket API, one inference session per connection.

The handler accepts the socket, checks its origin and forwards frames to a
``GenerateConnection``, which owns the session and its generations. Closing the connection,
cleanly or not, tears the session down.
"""

from typing import List, Optional, Union
from urllib.parse import urlparse

import tornado.websocket

from handlers.auth import SUBPROTOCOL
from handlers.base import JSONErrors
from handlers.connection import GenerateConnection
from sessions.accounts.book import Caller
from sessions.observe.logs import new_connection_id

# WebSocket close codes: "done" (a client that closes with it ends even a resumable session),
# and "try again later".
NORMAL_CLOSURE = 1000
TRY_AGAIN_LATER = 1013


class GenerateWebSocket(JSONErrors, tornado.websocket.WebSocketHandler):
    """One client connection of the WebSocket API."""

    def initialize(self) -> None:
        self.connection: Optional[GenerateConnection] = None
        self.caller: Optional[Caller] = None

    def prepare(self) -> None:
        # Checked before the upgrade, so a client without a valid key gets a plain 401.
        self.caller = self.request_caller()

    def select_subprotocol(self, subprotocols: List[str]) -> Optional[str]:
        # A browser fails the connection unless one of the subprotocols it offered is chosen.
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None

    def check_origin(self, origin: str) -> bool:
        # The API is public by default, like the original service; an allow-list narrows it.
        allowed = self.config.allowed_origins
        return not allowed or origin in allowed or self._same_origin(origin)

    def _same_origin(self, origin: Optional[str]) -> bool:
        return bool(origin) and urlparse(origin).netloc.lower() == self.request.host.lower()

    async def open(self) -> None:
        # Replies are small and streamed token by token: Nagle's algorithm would hold each
        # one back until the previous is acknowledged (up to the peer's delayed-ACK time).
        self.set_nodelay(True)
        origin = self.request.headers.get("Origin")
        client = self.caller.client
        self.connection = GenerateConnection(
            new_connection_id(), self.manager, self._send, client, trusted=self._same_origin(origin),
            max_message_bytes=self.config.max_message_bytes, debug=self.config.debug)
        self.open_websockets.add(self)
        self.connection.log.info("Connected from %s (origin %s)", client, origin)
        if not await self.connection.admit():
            # Refused: a client that ignores the close frame gets nothing served until Tornado
            # gives up on the closing handshake.
            self.connection = None
            self.close(TRY_AGAIN_LATER, "Too many connections")

    async def on_message(self, message: Union[str, bytes]) -> None:
        if self.connection is not None:
            await self.connection.on_message(message)

    async def _send(self, frame: str) -> None:
        try:
            await self.write_message(frame)
        except tornado.websocket.WebSocketClosedError:
            self.connection.log.debug("Reply dropped: the connection is closed")

    def on_close(self) -> None:
        self.open_websockets.discard(self)
        if self.connection is not None:
            self.connection.log.info("Disconnected (code %s)", self.close_code)
            self.connection.close(by_client=self.close_code == NORMAL_CLOSURE)
