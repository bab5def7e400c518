"""Generation through the real local swarm matches the same weights run locally."""

import pytest
import torch
from transformers import AutoModelForCausalLM

NEW_TOKENS = 24
PROMPT = "A cat sat on the mat and then, café 日本語 1234"


@pytest.mark.parametrize("repository", ["tests/tiny-llama", "tests/tiny-bloom"])
def test_greedy_tokens_match_local_transformers(manager, repository):
    loaded = manager.registry.find(repository)
    input_ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    through_swarm = loaded.client.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)

    local = AutoModelForCausalLM.from_pretrained(loaded.spec.path, torch_dtype=torch.float32)
    # Random tiny models never emit EOS by design; keep generating to the full length either way.
    reference = local.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                               pad_token_id=loaded.tokenizer.pad_token_id)

    swarm_ids = through_swarm[0, input_ids.shape[1]:].tolist()
    local_ids = reference[0, input_ids.shape[1]:].tolist()
    assert len(local_ids) == NEW_TOKENS
    assert swarm_ids == local_ids[: len(swarm_ids)]
    assert len(swarm_ids) == NEW_TOKENS or swarm_ids[-1] == loaded.tokenizer.eos_token_id


def test_default_model_answers_paris_through_the_swarm(manager):
    loaded = manager.registry.find("default")
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    input_ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    output = loaded.client.generate(input_ids, max_new_tokens=20, do_sample=False)
    answer = loaded.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.parametrize("repository", ["tests/tiny-llama", "tests/tiny-bloom"])
def test_token_stream_matches_local_transformers_across_turns(manager, repository):
    from sessions.engine.token_stream import TokenStream

    loaded = manager.registry.find(repository)
    first_turn = loaded.tokenizer(PROMPT)["input_ids"]
    second_turn = loaded.tokenizer(" and then")["input_ids"]
    stream = TokenStream(loaded, max_length=128)
    try:
        streamed = stream.step(first_turn)  # without a draft, each step chooses one token
        streamed += [token for _ in range(9) for token in stream.step()]
        streamed += stream.step(second_turn)  # a new turn continues the same session
        streamed += [token for _ in range(9) for token in stream.step()]
        assert stream.position == len(first_turn) + 10 + len(second_turn) + 9
    finally:
        stream.close()

    local = AutoModelForCausalLM.from_pretrained(loaded.spec.path, torch_dtype=torch.float32)
    expected = []
    with torch.inference_mode():
        ids = torch.tensor([first_turn])
        for step in range(20):
            if step == 10:
                ids = torch.cat([ids, torch.tensor([second_turn])], dim=1)
            expected.append(int(local(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=1)
    assert streamed == expected
