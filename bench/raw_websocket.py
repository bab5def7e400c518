"""A bare WebSocket client over a plain socket: it does only what a test tells it to.

Unlike a real client it never answers a close frame, so a test can play a client that ignores
being refused, or one that sends as fast as its socket allows. The tests and the benchmarks
share it.
"""

import asyncio
import base64
import json
import os
import struct
from typing import Dict, Optional, Tuple

TEXT, CLOSE = 0x1, 0x8


class RawWebSocket:
    """One connection to ``/api/v2/generate`` that sends masked frames and reads whole frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str = "/api/v2/generate",
                      source_ip: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> "RawWebSocket":
        """Opens the connection (from ``source_ip``, when given: a test's or a bench's other client),
        with ``headers`` added to the upgrade request."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source_ip, 0) if source_ip else None)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"{extra}\r\n").encode())
        status = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"upgrade refused: {status[:200]!r}")
        return cls(reader, writer)

    def send_frame(self, payload: bytes, opcode: int = TEXT) -> None:
        """Queues one masked frame (not awaited: a flood writes as fast as the socket takes it)."""
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload)) if length < 4096 else \
            (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (length // 4 + 1))[:length], "big")
             ).to_bytes(length, "big")
        self.writer.write(header + mask + masked)

    async def send(self, message) -> None:
        """Sends one JSON text message."""
        self.send_frame(json.dumps(message).encode())
        await self.writer.drain()

    async def receive_frame(self, timeout: float = 10.0) -> Optional[Tuple[int, bytes]]:
        """The next frame as (opcode, payload); None when the server closed the TCP connection
        (``asyncio.TimeoutError`` when nothing came within ``timeout``)."""
        try:
            first, second = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        """Drops the TCP connection (no close frame)."""
        self.writer.close()
