"""Helpers shared by the tests that run an app in the test process."""

import asyncio
from pathlib import Path

from sessions.accounts.store import KeyStore


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


def add_keys(path: Path, **limits_by_name) -> dict:
    """API keys added to the key database at ``path`` (``name=KeyLimits(...)``): name -> secret."""
    with KeyStore(path) as store:
        return {name: store.add_key(name, limits) for name, limits in limits_by_name.items()}


def bearer(secret: str) -> dict:
    """The header that presents API key ``secret``."""
    return {"Authorization": f"Bearer {secret}"}
