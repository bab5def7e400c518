"""Loading a model's tokenizer, including files written by newer transformers releases.

This server runs transformers 4.34 (petals' pin). Current checkpoints often carry tokenizer
files it cannot read: a ``tokenizer_class`` it does not know (``Qwen2Tokenizer``), a
``tokenizer.json`` whose BPE merges are written as pairs (tokenizers 0.20 and later) and a chat
template in a file of its own (``chat_template.jinja``). What can be read directly is; otherwise
the tokenizer is rebuilt from ``tokenizer.json`` and the special tokens of
``tokenizer_config.json``, which is all a fast tokenizer is made of.
"""

import json
import logging
from typing import Any, Dict, Optional

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import cached_file

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class UnreadableTokenizer(ValueError):
    """A tokenizer this server can neither load nor rebuild."""


def _file(source: str, name: str) -> Optional[str]:
    """The path of ``source``'s file ``name`` (a local folder's, or downloaded), None if it has none."""
    return cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def _read_json(source: str, name: str) -> Dict[str, Any]:
    path = _file(source, name)
    if path is None:
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _token_text(value: Any) -> Optional[str]:
    # tokenizer_config.json writes a special token as its text or as an AddedToken's fields.
    return value.get("content") if isinstance(value, dict) else value


def merges_as_text(tokenizer_json: Dict[str, Any]) -> Dict[str, Any]:
    """``tokenizer_json`` with BPE merges written as pairs turned into "left right" strings, the
    only form tokenizers 0.14 reads; ``UnreadableTokenizer`` when a token holds a space (the
    string form cannot write it)."""
    model = tokenizer_json.get("model") or {}
    merges = model.get("merges")
    if not merges or isinstance(merges[0], str):
        return tokenizer_json
    if any(" " in part for pair in merges for part in pair):
        raise UnreadableTokenizer("its BPE merges hold tokens with spaces, which this tokenizers release cannot read")
    return {**tokenizer_json, "model": {**model, "merges": [" ".join(pair) for pair in merges]}}


def rebuild_tokenizer(source: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer made from ``source``'s ``tokenizer.json`` and ``tokenizer_config.json``."""
    from tokenizers import Tokenizer

    tokenizer_json = _read_json(source, "tokenizer.json")
    if not tokenizer_json:
        raise UnreadableTokenizer(f"{source} has no tokenizer.json to rebuild its tokenizer from")
    settings = _read_json(source, "tokenizer_config.json")
    special = {name: _token_text(settings[name]) for name in SPECIAL_TOKENS if settings.get(name) is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(merges_as_text(tokenizer_json))),
        model_max_length=settings.get("model_max_length", int(1e30)), name_or_path=source,
        chat_template=settings.get("chat_template"), **special)


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of the model at ``source`` (a folder or a hub repository), with its chat
    template wherever it is kept; ``UnreadableTokenizer`` when it can be neither loaded nor rebuilt."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # an unknown class (ValueError), or a tokenizer.json of a newer format (tokenizers')
        logger.info("Rebuilding the tokenizer of %s from its files (%s)", source, str(error).splitlines()[0][:200])
        try:
            tokenizer = rebuild_tokenizer(source)
        except UnreadableTokenizer:
            raise
        except Exception as rebuild_error:  # the rebuilt tokenizer.json is no better
            raise UnreadableTokenizer(f"cannot read the tokenizer of {source}: {rebuild_error}") from rebuild_error
    if not getattr(tokenizer, "chat_template", None):
        template_path = _file(source, CHAT_TEMPLATE_FILE)
        if template_path is not None:
            with open(template_path, encoding="utf-8") as file:
                tokenizer.chat_template = file.read()
    return tokenizer
