"""The session manager used directly: stopping generations that have not started yet."""

import asyncio

from sessions.session import GenerationRequest

TINY = "tests/tiny-llama"
STREAM = GenerationRequest(inputs="Once upon a time", max_new_tokens=1, stop_sequence="never-appears")


async def test_stop_before_the_first_step_cancels_running_and_queued_generations(manager):
    """``stop`` in the same tick as ``generate`` (both frames in one read) must not be lost."""
    replies = {1: [], 2: []}
    finished = {1: asyncio.Event(), 2: asyncio.Event()}

    def sender(number):
        async def send(reply):
            replies[number].append(reply)
            if reply.stop:
                finished[number].set()
        return send

    await manager.open_session("stop-test", TINY, 256, "127.0.0.1")
    try:
        manager.start_generation("stop-test", STREAM, sender(1))
        manager.start_generation("stop-test", STREAM, sender(2))
        assert manager.stop_generation("stop-test") is True  # neither has begun a step yet
        await asyncio.wait_for(asyncio.gather(finished[1].wait(), finished[2].wait()), 30)
        for number in (1, 2):
            assert [(reply.stop, reply.finish_reason) for reply in replies[number]] == [(True, "cancelled")]
            assert replies[number][0].token_count == 0
    finally:
        manager.close_connection("stop-test")
