"""GGUF files of every family we serve, written as llama.cpp writes them (``tests/gguf_writer.py``),
convert into folders that our blocks compute exactly as a current transformers computes the original
checkpoints; their tokenizers cut text as the families' own tokenizers do; and what the converter
cannot map is refused with a clear error.
"""

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import regex
import torch
from transformers import AutoTokenizer
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from swarm.convert_gguf import convert_gguf, convert_gguf_once
from swarm.families.rope import RotaryEmbedding
from tests.family_reference import LOGITS_TOLERANCE, REFERENCE_TRANSFORMERS, load_reference, our_logits
from tests.gguf_writer import write_gguf

CHECKPOINTS = ("llama3", "mistral", "qwen2", "qwen3", "llama2", "llama-linear", "llama-dynamic")
# The pre-tokenizer name llama.cpp gives each family's tokenizer (SmolLM2's for the others).
PRE_TOKENIZER_NAMES = {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}
# GGUF has no dynamic NTK scaling (llama.cpp writes nothing for it), so the file of that checkpoint
# holds the model without its scaling.
SCALING_LOST = {"llama-dynamic"}
CONFIG_ATTRIBUTES = ("model_type", "qkv_bias", "output_bias", "mlp_bias", "qk_norm", "head_dim", "attention_window",
                     "tie_word_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
                     "rope_theta", "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")

SAMPLE_TEXTS = [
    "Hello world! 12345 and 3.14159, 2024-06-01",
    "I don't think they'll've gone; DON'T, It's, WE'RE, you'D",
    "a    b\t\tc\n\n\nd  \n  e   ",
    "line one\r\nline two\n\n\n  indented\n",
    "café naïve 日本語 Ελληνικά русский 🦀 🇫🇷",
    "cafe\u0301 and A\u030a",  # decomposed accents (NFC composes them)
    "x=1+2; y = [3, 4]\n    return x ** 2  # sq",
    "'s 'S 'll 'LL 'Re ''quoted''",
    "<|im_start|>user\nHi there<|im_end|>\n",
]
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

# The pre-tokenizers of the families' own tokenizer.json files (Llama 3's, Qwen2's, SmolLM2's, GPT-2's).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_GPT2_BYTES = {**_BYTES, "use_regex": True}
FAMILY_TOKENIZERS = {
    "llama-bpe": (None, {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}, _BYTES]}),
    "qwen2": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}, _BYTES]}),
    "smollm": (None, {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _GPT2_BYTES]}),
    "gpt-2": (None, _GPT2_BYTES),
}
# llama.cpp's own regexes for these names (llama-vocab.cpp), applied one after the other.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_REGEXES = {
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "smollm": [r"\p{N}", _GPT2_REGEX],
    "gpt-2": [_GPT2_REGEX],
}
_REFERENCE_TOKENIZE = """
import json, sys
from transformers import PreTrainedTokenizerFast
texts = json.loads(sys.stdin.read())
result = {}
for name, path in json.loads(sys.argv[1]).items():
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=path)
    backend = tokenizer.backend_tokenizer
    normalize = backend.normalizer.normalize_str if backend.normalizer else (lambda text: text)
    result[name] = {"ids": [tokenizer.encode(text, add_special_tokens=False) for text in texts],
                    "pieces": [[piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalize(text))]
                               for text in texts]}
print(json.dumps(result))
"""


def _pre_tokenizer_name(name: str) -> str:
    return PRE_TOKENIZER_NAMES.get(name, "smollm")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, family_reference_dir, default_model_dir) -> Dict[str, Path]:
    """Every reference checkpoint written as a GGUF file and converted back into a folder."""
    root = tmp_path_factory.mktemp("gguf-families")
    return {name: convert_gguf(write_gguf(family_reference_dir / name, default_model_dir, root / f"{name}.gguf",
                                          _pre_tokenizer_name(name)), root / name)
            for name in CHECKPOINTS}


def _without_scaling(checkpoint: Path, dest: Path) -> Path:
    """A copy of ``checkpoint`` without its rope_scaling: the model its GGUF file holds."""
    dest.mkdir()
    shutil.copy(checkpoint / "model.safetensors", dest / "model.safetensors")
    config = json.loads((checkpoint / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "rope_scaling": None}))
    return dest


def _family_config(folder: Path):
    """The config our nodes read from ``folder``, of a family they serve."""
    from petals.utils.auto_config import AutoDistributedConfig

    from swarm.petals_api import supported_model_types  # registers our families, before petals is imported

    config = AutoDistributedConfig.from_pretrained(folder)
    assert config.model_type in supported_model_types()
    return config


def _max_difference(ours: torch.Tensor, expected: torch.Tensor) -> float:
    assert ours.shape == expected.shape
    return float((ours - expected).abs().max())


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("prompt", ("short", "long"))
def test_a_converted_gguf_computes_the_reference_logits(tmp_path, family_reference_dir, converted, name, prompt):
    reference = load_reference(family_reference_dir / name)
    ids = reference[f"{prompt}_ids"].tolist()
    expected = reference[f"{prompt}_logits"]
    if name in SCALING_LOST and prompt == "long":  # past the context where the scaling starts to act
        expected = our_logits(_without_scaling(family_reference_dir / name, tmp_path / name), ids, [len(ids)])
        assert _max_difference(expected, reference["long_logits"]) > 1.0  # the scaling did act
    assert _max_difference(our_logits(converted[name], ids, [len(ids)]), expected) < LOGITS_TOLERANCE


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_a_converted_config_is_the_familys(family_reference_dir, converted, name):
    ours, original = _family_config(converted[name]), _family_config(family_reference_dir / name)
    assert type(ours) is type(original)
    for attribute in CONFIG_ATTRIBUTES:
        assert getattr(ours, attribute) == getattr(original, attribute), attribute
    assert ours.unservable_reason() is None
    if name in SCALING_LOST:
        assert ours.rope_scaling is None
        return
    # The same rotation: Llama 3's parameters are derived from llama.cpp's factors, so compare what they give.
    our_rope, original_rope = RotaryEmbedding(ours, ours.head_dim), RotaryEmbedding(original, original.head_dim)
    assert our_rope.kind == original_rope.kind
    if original.rope_scaling:
        assert ours.rope_scaling["factor"] == original.rope_scaling["factor"]
    assert torch.equal(our_rope.inv_freq, original_rope.inv_freq)
    assert our_rope.attention_factor == original_rope.attention_factor


LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [
    LLAMA31_SCALING,  # Llama 3.1 to 3.3's own: read back as published
    {**LLAMA31_SCALING, "high_freq_factor": 32.0},  # two frequencies blended
    {**LLAMA31_SCALING, "factor": 4.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 4096},  # one
])
def test_llama3_scalings_come_back_from_llama_cpp_factors(tmp_path, family_reference_dir, default_model_dir, scaling):
    checkpoint = shutil.copytree(family_reference_dir / "llama3", tmp_path / "llama3")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling}))
    folder = convert_gguf(write_gguf(checkpoint, default_model_dir, tmp_path / "llama3.gguf", "llama-bpe"),
                          tmp_path / "converted")
    converted_scaling = json.loads((folder / "config.json").read_text())["rope_scaling"]
    if scaling is LLAMA31_SCALING:
        assert converted_scaling == scaling
    ours, original = _family_config(folder), _family_config(checkpoint)
    assert torch.allclose(RotaryEmbedding(ours, 16).inv_freq, RotaryEmbedding(original, 16).inv_freq, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory, converted, family_reference_dir, default_model_dir) -> Dict[str, Path]:
    """A converted folder for each pre-tokenizer name."""
    folders = {_pre_tokenizer_name(name): folder for name, folder in converted.items()}
    root = tmp_path_factory.mktemp("gguf-gpt2")
    folders["gpt-2"] = convert_gguf(write_gguf(family_reference_dir / "llama2", default_model_dir,
                                               root / "gpt2.gguf", "gpt-2"), root / "gpt2")
    return folders


@pytest.fixture(scope="module")
def family_tokenization(tmp_path_factory, default_model_dir) -> Dict[str, dict]:
    """Ids and pre-tokenized pieces of the sample texts by the families' own tokenizer definitions
    (the default model's vocabulary), as transformers 4.57 and its tokenizers release compute them."""
    root = tmp_path_factory.mktemp("family-tokenizers")
    base = json.loads((default_model_dir / "tokenizer.json").read_text())
    files = {}
    for name, (normalizer, pre_tokenizer) in FAMILY_TOKENIZERS.items():
        files[name] = str(root / f"{name}.json")
        Path(files[name]).write_text(json.dumps({**base, "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
                                                 "post_processor": None}))
    finished = subprocess.run([sys.executable, "-c", _REFERENCE_TOKENIZE, json.dumps(files)],
                              input=json.dumps(SAMPLE_TEXTS), capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONPATH=str(REFERENCE_TRANSFORMERS)))
    return json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pre", sorted(FAMILY_TOKENIZERS))
def test_a_converted_tokenizer_encodes_as_the_familys_own(tokenizer_folders, family_tokenization, pre):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folders[pre])
    backend = tokenizer.backend_tokenizer
    normalize = backend.normalizer.normalize_str if backend.normalizer else (lambda text: text)
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in SAMPLE_TEXTS]
    assert ids == family_tokenization[pre]["ids"]
    pieces = [[piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalize(text))] for text in SAMPLE_TEXTS]
    assert pieces == family_tokenization[pre]["pieces"]


def _llama_cpp_pieces(text: str, patterns: List[str]) -> List[str]:
    """``text`` cut as llama.cpp cuts it: each regex splits every piece left by the previous one
    into its matches and the stretches between them."""
    pieces = [text]
    for pattern in patterns:
        cut = []
        for piece in pieces:
            position = 0
            for match in regex.finditer(pattern, piece):
                cut += [piece[position:match.start()], match.group()] if match.start() > position else [match.group()]
                position = match.end()
            cut += [piece[position:]] if position < len(piece) else []
        pieces = cut
    return pieces


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_REGEXES))
def test_a_converted_tokenizer_cuts_text_as_llama_cpp(tokenizer_folders, pre):
    backend = AutoTokenizer.from_pretrained(tokenizer_folders[pre]).backend_tokenizer
    to_text = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    for text in SAMPLE_TEXTS:
        if any(token in text for token in SPECIAL_TOKENS):
            continue  # special tokens are taken out before pre-tokenizing
        # Qwen2's tokenizer composes characters (NFC) first; llama.cpp does not.
        text = unicodedata.normalize("NFC", text) if pre == "qwen2" else text
        ours = [bytes(to_text[symbol] for symbol in piece).decode("utf-8")
                for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == _llama_cpp_pieces(text, LLAMA_CPP_REGEXES[pre]), text


def test_digits_are_grouped_as_each_family_groups_them(tokenizer_folders):
    pieces = {pre: [piece for piece, _ in AutoTokenizer.from_pretrained(folder).backend_tokenizer
                    .pre_tokenizer.pre_tokenize_str("x 1234567")]
              for pre, folder in tokenizer_folders.items()}
    assert pieces["llama-bpe"] == ["x", "Ġ", "123", "456", "7"]
    assert pieces["qwen2"] == ["x", "Ġ", "1", "2", "3", "4", "5", "6", "7"]
    assert pieces["smollm"] == ["x", "Ġ", "1", "2", "3", "4", "5", "6", "7"]
    assert pieces["gpt-2"] == ["x", "Ġ1234567"]


@pytest.mark.parametrize("pre", ("llama-bpe", "qwen2"))
def test_special_tokens_and_chat_template_survive(tokenizer_folders, pre):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folders[pre])
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    for text in SAMPLE_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == (
            unicodedata.normalize("NFC", text) if pre == "qwen2" else text)


@pytest.mark.parametrize("name, pre, options, message", [
    ("llama2", "smollm", {"architecture": "gemma2"}, "unsupported GGUF architecture 'gemma2'"),
    ("llama2", "tekken", {}, "unsupported GGUF pre-tokenizer 'tekken'"),
    ("llama2", "smollm", {"architecture": "qwen2"},
     r"attention biases \(attn_k, attn_output, attn_q, attn_v\) do not fit qwen2"),
    ("mistral", "smollm", {"rope_freqs": np.array([1, 8, 2, 8] * 4, dtype=np.float32)},
     "rope_freqs.weight does not follow"),
])
def test_what_cannot_be_converted_is_refused(tmp_path, family_reference_dir, default_model_dir, name, pre, options,
                                             message):
    gguf_path = write_gguf(family_reference_dir / name, default_model_dir, tmp_path / "model.gguf", pre, **options)
    with pytest.raises(ValueError, match=message):
        convert_gguf(gguf_path, tmp_path / "out")
    assert [path.name for path in tmp_path.iterdir()] == ["model.gguf"]


def test_a_truncated_file_is_refused(tmp_path):
    (tmp_path / "cut.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="not a complete GGUF file"):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "out")


def test_convert_gguf_once_converts_a_file_once_and_again_when_it_changes(tmp_path, family_reference_dir,
                                                                          default_model_dir):
    gguf_path = write_gguf(family_reference_dir / "qwen3", default_model_dir, tmp_path / "Tiny-Qwen3.Q8_0.gguf",
                           "qwen2")
    cache = tmp_path / "cache"
    folder = convert_gguf_once(gguf_path, cache)
    assert folder == cache / "gguf" / "Tiny-Qwen3.Q8_0"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3"
    sentinel = folder / "sentinel"
    sentinel.touch()
    assert convert_gguf_once(gguf_path, cache) == folder and sentinel.exists()  # reused as it is

    stat = gguf_path.stat()
    os.utime(gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    assert convert_gguf_once(gguf_path, cache) == folder and not sentinel.exists()

    sentinel.touch()
    (folder / ".complete").unlink()  # an interrupted conversion
    assert convert_gguf_once(gguf_path, cache) == folder and not sentinel.exists()
    assert (folder / "model.safetensors").exists()


def test_convert_gguf_once_leaves_no_folder_for_a_refused_file(tmp_path, family_reference_dir, default_model_dir):
    gguf_path = write_gguf(family_reference_dir / "llama2", default_model_dir, tmp_path / "odd.gguf", "tekken")
    with pytest.raises(ValueError, match="pre-tokenizer 'tekken'"):
        convert_gguf_once(gguf_path, tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf" / "odd").exists()
    assert [path.name for path in (tmp_path / "cache" / "gguf").iterdir() if not path.name.endswith(".lock")] == []
