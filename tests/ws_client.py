"""A small WebSocket client for tests: JSON in, JSON out, with timeouts."""

import asyncio
import json

import tornado.httpclient
import tornado.websocket

REPLY_TIMEOUT = 60


class WSClient:
    """One connection to ``/api/v2/generate``."""

    def __init__(self, connection):
        self.connection = connection

    @classmethod
    async def connect(cls, port: int, origin: str = None, headers: dict = None, subprotocols: list = None
                      ) -> "WSClient":
        headers = dict(headers or {}, **({"Origin": origin} if origin else {}))
        request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/api/v2/generate", headers=headers)
        return cls(await tornado.websocket.websocket_connect(request, subprotocols=subprotocols))

    async def send(self, message) -> None:
        await self.connection.write_message(message if isinstance(message, str) else json.dumps(message))

    async def receive(self, timeout: float = REPLY_TIMEOUT):
        raw = await asyncio.wait_for(self.connection.read_message(), timeout)
        return None if raw is None else json.loads(raw)

    async def request(self, message, timeout: float = REPLY_TIMEOUT):
        await self.send(message)
        return await self.receive(timeout)

    async def stream(self, message, timeout: float = REPLY_TIMEOUT) -> list:
        """Sends a generate and collects replies up to the one with stop: true (or an error)."""
        await self.send(message)
        replies = []
        while True:
            reply = await self.receive(timeout)
            replies.append(reply)
            if reply is None or not reply["ok"] or reply["stop"]:
                return replies

    def close(self) -> None:
        self.connection.close()
