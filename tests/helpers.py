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
