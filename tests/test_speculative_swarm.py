"""Speculative decoding and going back, on the real swarm through the real APIs: drafts verified
in one step give the text plain decoding gives, token for token, and a session cut back to an
earlier position goes on as a fresh session fed the same tokens would."""

import openai
import pytest

from sessions.requests import GenerationRequest
from tests.ws_client import WSClient

DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
FAMILY = "tests/tiny-qwen2"  # two nodes, each with half of the blocks
QUOTE = ("The lighthouse stood on a rock a mile from the coast. Every evening the keeper climbed the "
         "steps to light the lamp, and every morning he climbed them again to put it out.")


@pytest.fixture
def client(ws_port):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ws_port}/v1", api_key="unused", max_retries=0)


def fed_tokens(manager) -> float:
    """Prompt tokens of the default model fed through the swarm so far, as /metrics counts them."""
    return manager.metrics.registry.get_sample_value("swarm_chat_input_tokens_total", {"model": DEFAULT}) or 0


def drafted(manager, model: str, source: str = "prompt_lookup") -> tuple:
    """(accepted, drafted) draft tokens of ``model`` so far, as /metrics counts them."""
    sample = manager.metrics.registry.get_sample_value
    labels = {"model": model, "source": source}
    return (sample("swarm_chat_accepted_draft_tokens_total", labels) or 0,
            sample("swarm_chat_drafted_tokens_total", labels) or 0)


@pytest.mark.parametrize("model", [DEFAULT, FAMILY])
async def test_greedy_output_with_drafts_is_plain_decoding_token_for_token(manager, model):
    prompt = f"<|im_start|>user\nRepeat exactly: {QUOTE}<|im_end|>\n<|im_start|>assistant\n{QUOTE[:40]}"
    texts, steps, tokens = {}, {}, {}
    for speculative in (False, True):
        accepted_before, drafted_before = drafted(manager, model)
        session = await manager.open_session(f"spec-{speculative}", model, 256, "127.0.0.1")
        updates = [update async for update in session.generate(GenerationRequest(
            inputs=prompt, max_new_tokens=48, speculative=speculative, trace_route=True))]
        await session.aclose("test done")
        texts[speculative], steps[speculative] = updates[-1].outputs, updates[-1].route["steps"]
        tokens[speculative] = updates[-1].token_count
        accepted, drafted_now = drafted(manager, model)
        if speculative:  # drafts were verified, and some turned down: the swarm went back
            assert drafted_now - drafted_before > accepted - accepted_before
        else:
            assert drafted_now == drafted_before
        if speculative and model == DEFAULT:  # a real model quotes: drafts are taken, steps saved
            assert accepted > accepted_before
    assert texts[True] == texts[False] and len(texts[True]) > 40
    assert steps[False] == tokens[False] == tokens[True]  # plain: one step per token
    assert steps[True] < steps[False] or model != DEFAULT


def chat_turn(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


async def test_a_websocket_session_goes_back_to_an_earlier_position(ws_port):
    ws, fresh = await WSClient.connect(ws_port), await WSClient.connect(ws_port)
    try:
        for connection in (ws, fresh):
            assert (await connection.request({"type": "open_inference_session", "model": DEFAULT,
                                              "max_length": 256}))["ok"]
        first = await ws.stream({"type": "generate", "inputs": chat_turn("Name a fruit."), "max_new_tokens": 6})
        length = first[-1]["session_length"]
        turn = {"type": "generate", "inputs": "<|im_end|>\n" + chat_turn("Name a colour."), "max_new_tokens": 8}
        second = await ws.stream(turn)
        assert second[-1]["session_length"] > length + 8
        # Regenerate the second turn: the same text again, from the caches of the first.
        again = await ws.stream({**turn, "from_position": length})
        assert again[-1]["outputs"] == second[-1]["outputs"]
        assert again[-1]["session_length"] == second[-1]["session_length"]
        # Edit it: a fresh session fed the first turn and the edited one writes the same.
        edit = {**turn, "inputs": "<|im_end|>\n" + chat_turn("Count from one to five.")}
        edited = await ws.stream({**edit, "from_position": length})
        fresh_first = await fresh.stream({"type": "generate", "inputs": chat_turn("Name a fruit."),
                                          "max_new_tokens": 6})
        fresh_edited = await fresh.stream(edit)
        assert fresh_first[-1]["outputs"] == first[-1]["outputs"]
        assert edited[-1]["outputs"] == fresh_edited[-1]["outputs"] != second[-1]["outputs"]
        # Without inputs the model writes again what follows the kept tokens.
        rewritten = await ws.stream({"type": "generate", "max_new_tokens": 6, "from_position": length})
        assert rewritten[-1]["outputs"] == (await fresh.stream(
            {"type": "generate", "max_new_tokens": 6, "from_position": length}))[-1]["outputs"]
        # Outside the conversation: refused, and the session goes on unchanged.
        for position, code in ((0, "bad_request"), (10_000, "invalid_request")):
            refused = await ws.request({**turn, "from_position": position})
            assert refused["ok"] is False and refused["code"] == code and "from_position" in refused["traceback"]
        assert (await ws.stream({**turn, "from_position": length}))[-1]["outputs"] == second[-1]["outputs"]
    finally:
        ws.connection.close()
        fresh.connection.close()


async def test_a_prediction_is_drafted_from_and_counted_in_usage(client):
    code = "def area(width, height):\n    return width * height\n"
    messages = [{"role": "user", "content": f"Repeat this code exactly:\n{code}"}]
    plain = await client.chat.completions.create(model=DEFAULT, messages=messages, temperature=0, max_tokens=40,
                                                 extra_body={"speculative": False})
    predicted = await client.chat.completions.create(model=DEFAULT, messages=messages, temperature=0, max_tokens=40,
                                                     prediction={"type": "content", "content": code})
    assert predicted.choices[0].message.content == plain.choices[0].message.content
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 5
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=DEFAULT, messages=messages, max_tokens=4,
                                             prediction={"type": "image", "content": code})


async def test_a_regenerated_last_turn_reuses_the_conversation_before_it(client, manager, warm_pool):
    pool = warm_pool(max_sessions=4)
    conversation = [{"role": "user", "content": "Tell me about the sea. " * 4}]
    first = await client.chat.completions.create(model=DEFAULT, messages=conversation, temperature=0, max_tokens=8)
    fed_before = fed_tokens(manager)
    again = await client.chat.completions.create(model=DEFAULT, messages=conversation, temperature=0, max_tokens=8)
    # The same prompt: every prompt token but the last is reused (the reply after it is written
    # anew), and only that one goes through the swarm again.
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
    assert fed_tokens(manager) - fed_before == 1
    assert again.choices[0].message.content == first.choices[0].message.content
    edited = conversation[:-1] + [{"role": "user", "content": "Tell me about the sea. " * 3 + "And ships."}]
    reply = await client.chat.completions.create(model=DEFAULT, messages=edited, temperature=0, max_tokens=8)
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < reply.usage.prompt_tokens - 1  # the shared beginning only
    for session in pool.drain():
        await session.aclose("test: start afresh")
    fresh = await client.chat.completions.create(model=DEFAULT, messages=edited, temperature=0, max_tokens=8)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.choices[0].message.content == fresh.choices[0].message.content
