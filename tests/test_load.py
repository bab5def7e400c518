"""A short load and soak of the WebSocket API on the in-process app (bench/load_soak.py is the full size)."""

import asyncio
import dataclasses
import os

import pytest

from bench.load_clients import ProcessSample, run_load, run_soak, scrape_open_sessions, wait_for_no_open_sessions

TINY = "tests/tiny-llama"
STREAMS, SECONDS = 20, 5
SOAK_SESSIONS, SOAK_CONCURRENCY = 120, 20
# This process runs the server, its clients and the swarm's bootstrap peer: a little slack for
# threads and sockets that come and go, far below one per session.
THREAD_SLACK, FD_SLACK = 2, 10
RELEASE_TIMEOUT = 30
SETTLE_SECONDS = 1


@pytest.fixture
def raised_session_limits(manager, monkeypatch):
    """Every test client comes from 127.0.0.1, and a closed session is released in the background
    while its client may already open the next: lift the limits above this test's load."""
    monkeypatch.setattr(manager.admission, "settings", dataclasses.replace(
        manager.admission.settings, max_sessions=10_000, max_sessions_per_client=10_000,
        max_connections_per_client=10_000))


def urls(port: int) -> tuple:
    """The WebSocket API's URL and the server's base URL."""
    return f"ws://127.0.0.1:{port}/api/v2/generate", f"http://127.0.0.1:{port}"


async def open_sessions_once_released(base_url: str) -> int:
    """The open-session gauge once the server has released what it can (closes run in the background)."""
    return await wait_for_no_open_sessions(lambda: scrape_open_sessions(base_url), RELEASE_TIMEOUT)


async def test_concurrent_streams_run_without_errors(ws_port, raised_session_limits):
    url, base_url = urls(ws_port)
    load = await run_load(url, TINY, streams=STREAMS, seconds=SECONDS, session_length=128, tokens_per_generate=16)
    assert dict(load.errors) == {}
    assert load.streams_with_tokens == STREAMS
    assert load.generations >= STREAMS and len(load.latencies) == load.tokens
    assert await open_sessions_once_released(base_url) == 0


async def test_sessions_opened_and_closed_leave_nothing_behind(ws_port, raised_session_limits):
    url, base_url = urls(ws_port)
    warm_up = await run_soak(url, TINY, SOAK_CONCURRENCY, SOAK_CONCURRENCY)  # lazily started threads and pools
    assert dict(warm_up.errors) == {}
    assert await open_sessions_once_released(base_url) == 0
    await asyncio.sleep(SETTLE_SECONDS)
    before = ProcessSample.of(os.getpid())

    soak = await run_soak(url, TINY, SOAK_SESSIONS, SOAK_CONCURRENCY)
    assert dict(soak.errors) == {}
    assert soak.completed == SOAK_SESSIONS
    assert await open_sessions_once_released(base_url) == 0
    await asyncio.sleep(SETTLE_SECONDS)
    after = ProcessSample.of(os.getpid())
    assert after.threads <= before.threads + THREAD_SLACK, (before, after)
    assert after.fds <= before.fds + FD_SLACK, (before, after)
