"""Prefix reuse on the real swarm: a stateless request that continues a finished one feeds only
its new tokens, and answers exactly as a fresh session would."""

import dataclasses

import openai
import pytest

from tests.helpers import wait_for_no_sessions

DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tests/tiny-llama"


@pytest.fixture
def client(ws_port):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ws_port}/v1", api_key="unused", max_retries=0)


def fed_tokens(manager, model: str = DEFAULT) -> float:
    """Prompt tokens fed through the swarm so far, as /metrics counts them."""
    return manager.metrics.registry.get_sample_value("swarm_chat_input_tokens_total", {"model": model}) or 0


async def test_a_continued_conversation_feeds_only_its_new_tokens_and_answers_as_a_fresh_session(
        client, manager, warm_pool):
    pool = warm_pool(max_sessions=4)
    conversation = [{"role": "user", "content": "Name a colour."}]
    first = await client.chat.completions.create(model=DEFAULT, messages=conversation, temperature=0, max_tokens=8)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert len(pool) == 1 and manager.open_session_count == 1  # kept warm, still counted
    conversation += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And another one?"}]

    before = fed_tokens(manager)
    reused = await client.chat.completions.create(model=DEFAULT, messages=conversation, temperature=0, max_tokens=8)
    fed_reusing = fed_tokens(manager) - before
    # Every token of the first turn was in the swarm but its last, chosen and never fed.
    cached = reused.usage.prompt_tokens_details.cached_tokens
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert fed_reusing == reused.usage.prompt_tokens - cached

    for session in pool.drain():
        await session.aclose("test: start afresh")
    before = fed_tokens(manager)
    fresh = await client.chat.completions.create(model=DEFAULT, messages=conversation, temperature=0, max_tokens=8)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fed_tokens(manager) - before == fresh.usage.prompt_tokens
    assert reused.choices[0].message.content == fresh.choices[0].message.content
    assert reused.usage.completion_tokens == fresh.usage.completion_tokens


async def test_a_changed_history_opens_a_fresh_session(client, manager, warm_pool):
    pool = warm_pool(max_sessions=4)
    prompt = "Once upon a time"
    first = await client.completions.create(model=TINY, prompt=prompt, max_tokens=4, temperature=0)
    continued = prompt + first.choices[0].text + " and then"
    other = await client.completions.create(model=TINY, prompt="Twice upon a time" + first.choices[0].text,
                                            max_tokens=4, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # the history differs
    assert len(pool) == 2
    hit = await client.completions.create(model=TINY, prompt=continued, max_tokens=4, temperature=0,
                                          extra_body={"trace_route": True})
    assert hit.usage.prompt_tokens_details.cached_tokens > 0
    assert hit.model_extra["route"]["steps"] == 4  # the extension field, read through the official client
    assert "route" not in (first.model_extra or {})
    assert manager.metrics.registry.get_sample_value(
        "swarm_chat_prefix_reuse_requests_total", {"model": TINY, "outcome": "hit"}) == 1


async def test_a_warm_session_expires_and_is_released(client, manager, warm_pool):
    pool = warm_pool(max_sessions=4, max_age=0.5)
    await client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert len(pool) == 1 and manager.open_session_count == 1
    assert await wait_for_no_sessions(manager, timeout=10) > 0.3
    assert len(pool) == 0


async def test_a_client_at_its_session_limit_still_continues_its_warm_session(client, manager, warm_pool,
                                                                               monkeypatch):
    await wait_for_no_sessions(manager)
    pool = warm_pool(max_sessions=4)
    monkeypatch.setattr(manager.admission, "settings",
                        dataclasses.replace(manager.admission.settings, max_sessions_per_client=1))
    prompt = "Once upon a time"
    first = await client.completions.create(model=TINY, prompt=prompt, max_tokens=4, temperature=0)
    assert len(pool) == 1  # the client's one session, waiting
    hit = await client.completions.create(model=TINY, prompt=prompt + first.choices[0].text + " and then",
                                          max_tokens=4, temperature=0)
    assert hit.usage.prompt_tokens_details.cached_tokens > 0
    other = await client.completions.create(model=TINY, prompt="Something else entirely", max_tokens=2,
                                            temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # the warm one made room for it
