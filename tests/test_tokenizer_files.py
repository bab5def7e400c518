"""Tokenizers saved by a current transformers load here as the tokenizer they were made from."""

import json
import os
import subprocess
import sys

import pytest

from sessions.formats.tokenizer_files import UnreadableTokenizer, load_tokenizer, merges_as_text
from tests.family_reference import REFERENCE_TRANSFORMERS

SAMPLES = ("Hello wörld 1234", "don't  stop\n\n  now", "<|im_start|>user\nHi<|im_end|>", "日本語 café")
TEMPLATE = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"

# Saved by transformers 4.57: a class unknown here (Qwen2's), and a generic one whose tokenizer.json
# writes its merges as pairs, with the chat template in a file of its own.
SAVE_WITH_CURRENT_TRANSFORMERS = """
import sys
from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast
source, out = sys.argv[1], sys.argv[2]
Qwen2TokenizerFast(tokenizer_file=source + "/tokenizer.json", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                   bos_token=None, unk_token=None).save_pretrained(out + "/qwen")
generic = PreTrainedTokenizerFast(tokenizer_file=source + "/tokenizer.json", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
generic.chat_template = sys.argv[3]
generic.save_pretrained(out + "/generic")
"""


@pytest.fixture(scope="module")
def saved_by_current_transformers(tmp_path_factory, default_model_dir):
    out = tmp_path_factory.mktemp("tokenizers")
    subprocess.run([sys.executable, "-c", SAVE_WITH_CURRENT_TRANSFORMERS, str(default_model_dir), str(out), TEMPLATE],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REFERENCE_TRANSFORMERS)))
    return out


@pytest.mark.parametrize("kind", ["qwen", "generic"])
def test_they_tokenize_as_the_tokenizer_they_were_made_from(saved_by_current_transformers, default_model_dir, kind):
    original = load_tokenizer(str(default_model_dir))
    loaded = load_tokenizer(str(saved_by_current_transformers / kind))
    for text in SAMPLES:
        assert loaded(text)["input_ids"] == original(text)["input_ids"]
    assert loaded.eos_token == "<|im_end|>"


def test_pair_merges_were_what_needed_rebuilding(saved_by_current_transformers):
    tokenizer_json = json.loads((saved_by_current_transformers / "generic" / "tokenizer.json").read_text())
    assert isinstance(tokenizer_json["model"]["merges"][0], list)  # the newer format
    assert merges_as_text(tokenizer_json)["model"]["merges"][0] == " ".join(tokenizer_json["model"]["merges"][0])


def test_a_chat_template_kept_in_its_own_file_is_found(saved_by_current_transformers):
    assert (saved_by_current_transformers / "generic" / "chat_template.jinja").exists()
    assert load_tokenizer(str(saved_by_current_transformers / "generic")).chat_template == TEMPLATE


def test_merges_of_tokens_with_spaces_are_refused():
    with pytest.raises(UnreadableTokenizer, match="spaces"):
        merges_as_text({"model": {"type": "BPE", "merges": [["a b", "c"]]}})


def test_a_folder_without_tokenizer_files_is_refused_clearly(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnreadableTokenizer, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
