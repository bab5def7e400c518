"""Helpers shared by the tests that run an app in the test process."""

import asyncio


async def wait_for_no_sessions(manager, timeout: float = 10.0) -> float:
    """Seconds until the manager has no open session; fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while manager.open_session_count:
        assert loop.time() - started < timeout, f"{manager.open_session_count} sessions still open"
        await asyncio.sleep(0.05)
    return loop.time() - started


async def send_raw_post(port: int, path: str, body: bytes, content_type: str = "application/json",
                        length: int = None) -> tuple:
    """Writes a POST of ``body`` (announced as ``length`` bytes, its own by default) on a plain
    socket, so that a test may stop reading or leave mid-request; returns (reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), content_type.encode(), len(body) if length is None else length, body))
    await writer.drain()
    return reader, writer
