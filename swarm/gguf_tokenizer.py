"""The tokenizer stored in a GGUF file, rebuilt as a transformers fast tokenizer.

GGUF files of the families we convert carry a byte-level BPE vocabulary (``tokenizer.ggml.model``
"gpt2") and name their pre-tokenizer (``tokenizer.ggml.pre``): the rules that cut text into
words before BPE. llama.cpp compiles those rules into itself, one per name; here each known name
is rebuilt from ``tokenizers`` components as the model's own ``tokenizer.json`` declares it, and
any other name is refused rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)
from transformers import PreTrainedTokenizerFast

# llama.cpp's token types (gguf.TokenType): control tokens are special (never split, dropped by
# decode(skip_special_tokens=True)); user-defined ones are never split but are text.
_CONTROL_TOKEN_TYPE = 3
_USER_DEFINED_TOKEN_TYPE = 4

# The split regexes of the models' own tokenizer.json files (llama.cpp keeps them as comments
# beside its rewrites): Llama 3 groups digits by up to three, Qwen2 splits them one by one.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _regex_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    # As Llama 3's and Qwen2's tokenizer.json: split by the regex, then map bytes to BPE symbols
    # without GPT-2's own regex.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


@dataclass(frozen=True)
class _PreTokenization:
    """How one family of ``tokenizer.ggml.pre`` names cuts text."""

    build: Callable[[], pre_tokenizers.PreTokenizer]
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token
    normalizer: Optional[Callable[[], normalizers.Normalizer]] = None


_GPT2 = _PreTokenization(lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
_SMOLLM = _PreTokenization(lambda: pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
]))
# Llama 3's tokenizer.json also sets BPE's ignore_merges (a word found whole in the vocabulary is
# one token), which the tokenizers release we run lacks: such a word is built by merges instead,
# which can differ in rare cases.
_LLAMA3 = _PreTokenization(lambda: _regex_then_bytes(_LLAMA3_PATTERN), add_bos=True)
# Qwen2's tokenizer.json normalizes to NFC before splitting; llama.cpp does not, which differs
# only for text in decomposed form.
_QWEN2 = _PreTokenization(lambda: _regex_then_bytes(_QWEN2_PATTERN), normalizer=normalizers.NFC)

# The names llama.cpp gives each of these pre-tokenizers (llama-vocab.cpp).
PRE_TOKENIZATIONS: Dict[str, _PreTokenization] = {
    "gpt-2": _GPT2,
    "smollm": _SMOLLM,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
}


def build_tokenizer(meta: Dict[str, Any], model_max_length: int) -> PreTrainedTokenizerFast:
    """The fast tokenizer described by a GGUF file's ``tokenizer.*`` metadata ``meta``: its vocabulary
    and merges, its pre-tokenizer, its special tokens and chat template.

    Raises ValueError for a tokenizer model other than byte-level BPE or an unknown pre-tokenizer.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        known_as = " (SentencePiece, as Llama 2's and Mistral 7B's)" if kind == "llama" else ""
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}{known_as}: only 'gpt2' (byte-level BPE)")
    if "tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.merges" not in meta:
        raise ValueError("the GGUF file has no complete tokenizer (tokenizer.ggml.tokens and .merges)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZATIONS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}: known are {', '.join(sorted(PRE_TOKENIZATIONS))}")
    pre_tokenization = PRE_TOKENIZATIONS[pre]

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={text: i for i, text in enumerate(tokens)}, merges=merges))
    if pre_tokenization.normalizer is not None:
        tokenizer.normalizer = pre_tokenization.normalizer()
    tokenizer.pre_tokenizer = pre_tokenization.build()
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", ())
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                  for text, token_type in zip(tokens, types) if token_type == _CONTROL_TOKEN_TYPE])
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False)
                          for text, token_type in zip(tokens, types) if token_type == _USER_DEFINED_TOKEN_TYPE])

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[token_id]

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token", pre_tokenization.add_bos) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])],
        )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        model_max_length=model_max_length,
        # Llama's forward() takes no token_type_ids; without this the tokenizer returns them
        # and generate(**tokenizer(text)) fails.
        model_input_names=["input_ids", "attention_mask"],
        # The default (True) rewrites " ," to "," and so on, breaking decode(encode(s)) == s.
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = meta.get("tokenizer.chat_template")
    return wrapped
