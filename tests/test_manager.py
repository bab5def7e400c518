"""Chat sessions used directly on the real swarm: stopping generations that have not started yet."""

import asyncio

from sessions.requests import GenerationRequest

TINY = "tests/tiny-llama"
STREAM = GenerationRequest(inputs="Once upon a time", max_new_tokens=1, stop_sequence="never-appears")


async def replies_of(updates):
    return [update async for update in updates]


async def test_stop_before_the_first_step_cancels_running_and_queued_generations(manager):
    """``stop`` in the same tick as ``generate`` (both frames in one read) must not be lost."""
    session = await manager.open_session("stop-test", TINY, 256, "127.0.0.1")
    try:
        first, second = session.generate(STREAM), session.generate(STREAM)
        assert session.has_generations
        session.cancel_generations()  # neither has begun a step yet
        replies = await asyncio.wait_for(asyncio.gather(replies_of(first), replies_of(second)), 30)
        for generation in replies:
            assert [(reply.last, reply.finish_reason, reply.token_count) for reply in generation] == [
                (True, "cancelled", 0)]
    finally:
        await session.aclose("test done")
    assert session.released
