"""Each model family computes what a current transformers computes for the same checkpoint:
our blocks in-process, then the real swarm (each model split over two nodes) and the APIs.

The checkpoints and the reference logits and greedy continuations come from
``tests/reference/build_families.py``, run with transformers 4.57 (see ``tests/family_reference.py``).
"""

import openai
import pytest
import torch

from tests.family_reference import LOGITS_TOLERANCE, SWARM_FAMILIES, load_reference, our_logits, reference_prompt
from tests.helpers import wait_for_no_sessions
from tests.ws_client import WSClient

ALL_CHECKPOINTS = (*SWARM_FAMILIES, "llama2", "llama-linear", "llama-dynamic")
PROMPTS = ("short", "long")


def _max_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return float((ours - reference).abs().max())


@pytest.mark.parametrize("name", ALL_CHECKPOINTS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_our_blocks_compute_the_reference_logits(family_reference_dir, name, prompt):
    reference = load_reference(family_reference_dir / name)
    ids = reference[f"{prompt}_ids"].tolist()
    assert _max_difference(our_logits(family_reference_dir / name, ids, [len(ids)]),
                           reference[f"{prompt}_logits"]) < LOGITS_TOLERANCE


@pytest.mark.parametrize("name", [name for name in ALL_CHECKPOINTS if name != "llama-dynamic"])
def test_our_blocks_compute_the_same_logits_a_few_tokens_at_a_time(family_reference_dir, name):
    # Through petals' cache layout, across the scaling's original context and Mistral's window.
    # (Dynamic scaling depends on the length seen so far, so its stepped logits differ by design.)
    reference = load_reference(family_reference_dir / name)
    ids = reference["long_ids"].tolist()
    chunks = [5, 1, 1, 20, 1, 14, *([1] * (len(ids) - 42))]
    assert _max_difference(our_logits(family_reference_dir / name, ids, chunks),
                           reference["long_logits"]) < LOGITS_TOLERANCE


def _swarm_logits(loaded, ids, chunks) -> torch.Tensor:
    """Logits of every position of ``ids`` through the swarm, fed ``chunks`` tokens per step."""
    client = loaded.client
    outputs, start = [], 0
    with torch.inference_mode(), client.inference_session(max_length=len(ids)) as session:
        for size in chunks:
            embeddings = client.transformer.word_embeddings(torch.tensor([ids[start:start + size]]))
            hidden = session.step(embeddings)
            outputs.append(client.lm_head(client.transformer.ln_f(hidden)))
            start += size
        assert len(session._server_sessions) == 2  # the route crossed both nodes
    return torch.cat(outputs, dim=1)[0]


def _swarm_greedy(loaded, ids, count) -> list:
    client = loaded.client
    chosen = []
    with torch.inference_mode(), client.inference_session(max_length=len(ids) + count) as session:
        step_ids = ids
        for _ in range(count):
            hidden = session.step(client.transformer.word_embeddings(torch.tensor([step_ids])))
            token = int(client.lm_head(client.transformer.ln_f(hidden[:, -1:]))[0, -1].argmax())
            chosen.append(token)
            step_ids = [token]
    return chosen


@pytest.mark.parametrize("family", SWARM_FAMILIES)
def test_the_swarm_computes_the_reference_logits(manager, family_reference_dir, family):
    reference = load_reference(family_reference_dir / family)
    loaded = manager.registry.find(f"tests/tiny-{family}")
    for prompt in PROMPTS:
        ids = reference[f"{prompt}_ids"].tolist()
        chunks = [len(ids)] if prompt == "short" else [30, 1, 1, *([5] * ((len(ids) - 32) // 5)), (len(ids) - 32) % 5]
        assert _max_difference(_swarm_logits(loaded, ids, [size for size in chunks if size]),
                               reference[f"{prompt}_logits"]) < LOGITS_TOLERANCE


@pytest.mark.parametrize("family", SWARM_FAMILIES)
def test_the_swarm_continues_greedily_as_the_reference(manager, family_reference_dir, family):
    reference = load_reference(family_reference_dir / family)
    loaded = manager.registry.find(f"tests/tiny-{family}")
    for prompt in PROMPTS:
        expected = reference[f"{prompt}_greedy"].tolist()
        assert len(expected) == 32
        assert _swarm_greedy(loaded, reference[f"{prompt}_ids"].tolist(), 32) == expected


def _reference_text(loaded, reference, count: int) -> str:
    return loaded.tokenizer.decode(reference["short_greedy"][:count].tolist(), skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("family", SWARM_FAMILIES)
async def test_each_family_generates_through_the_websocket_api(ws_port, manager, family_reference_dir, family):
    reference = load_reference(family_reference_dir / family)
    model = f"tests/tiny-{family}"
    loaded = manager.registry.find(model)
    prompt = reference_prompt(family_reference_dir / family, "short")
    assert loaded.encode(prompt) == reference["short_ids"].tolist()
    client = await WSClient.connect(ws_port)
    assert (await client.request({"type": "open_inference_session", "model": model, "max_length": 64}))["ok"]
    reply = await client.request({"type": "generate", "inputs": prompt, "max_new_tokens": 12, "do_sample": 0})
    assert reply["ok"] and reply["token_count"] == 12
    assert reply["outputs"] == _reference_text(loaded, reference, 12)
    client.close()
    await wait_for_no_sessions(manager)


@pytest.mark.parametrize("family", SWARM_FAMILIES)
async def test_each_family_streams_through_the_openai_api(ws_port, manager, family_reference_dir, family):
    reference = load_reference(family_reference_dir / family)
    model = f"tests/tiny-{family}"
    loaded = manager.registry.find(model)
    prompt = reference_prompt(family_reference_dir / family, "short")
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ws_port}/v1", api_key="unused", max_retries=0)
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                             stream=True)
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text == _reference_text(loaded, reference, 12)
    await client.close()
    await wait_for_no_sessions(manager)
