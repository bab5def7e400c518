"""Idle sessions expire after the idle timeout; the connection can open a new one."""

import asyncio

import pytest

from config import Settings
from sessions.errors import SessionExpired
from sessions.requests import GenerationRequest
from sessions.serving.manager import build_manager


async def collect(session, request):
    return [update async for update in session.generate(request)]


@pytest.fixture
def short_lived_manager(io_loop, tiny_model_specs, settings):
    manager = build_manager(tiny_model_specs[:1], settings.initial_peers, "cpu", "float32",
                            settings=Settings(executor_workers=2, idle_timeout=1.0))
    io_loop.run_sync(manager.start)
    yield manager
    io_loop.run_sync(manager.close)


async def test_idle_session_expires_and_can_be_reopened(short_lived_manager):
    manager = short_lived_manager
    session = await manager.open_session("c1", "tests/tiny-llama", 64, "127.0.0.1")
    first = await collect(session, GenerationRequest(inputs="Hello", max_new_tokens=2))
    assert first[-1].last and first[-1].token_count == 2
    assert manager.open_session_count == 1
    await asyncio.sleep(2.0)  # longer than the idle timeout: the reaper closes the session
    assert manager.open_session_count == 0
    with pytest.raises(SessionExpired, match=f"Session {session.session_id} expired"):
        await collect(session, GenerationRequest(inputs="again", max_new_tokens=1))
    expired, session = session, await manager.open_session("c1", "tests/tiny-llama", 64, "127.0.0.1")
    assert session.session_id != expired.session_id and session.connection_id == expired.connection_id == "c1"
    again = await collect(session, GenerationRequest(inputs="Hello", max_new_tokens=1))
    assert again[-1].last and again[-1].token_count == 1
    await session.aclose("test done")
