"""The tokenizer stored in a GGUF file, rebuilt as a transformers fast tokenizer.

Two tokenizer models (``tokenizer.ggml.model``) are rebuilt:

- "gpt2", byte-level BPE: the file carries the merges and names its pre-tokenizer
  (``tokenizer.ggml.pre``), the rules that cut text into words before BPE. llama.cpp compiles
  those rules into itself, one per name; here each known name is rebuilt from ``tokenizers``
  components as the model's own ``tokenizer.json`` declares it, and any other name is refused
  rather than guessed.
- "llama", SentencePiece BPE (Llama 2, Mistral 7B): the file carries the pieces, their scores and
  their types, but no merges. As transformers' own conversion of these tokenizers, every piece made
  of two pieces is their merge, ranked by the merged piece's score (SentencePiece merges the
  adjacent pair whose piece scores highest); a space is written "▁" and one is prepended to the
  text (unless ``tokenizer.ggml.add_space_prefix`` is false), and, as llama.cpp does, to the text
  after a special token; characters outside the vocabulary fall back to the ``<0xNN>`` byte pieces. A SentencePiece
  unigram model, which llama.cpp writes under the same name, is recognised by its scores
  (log-probabilities rather than ranks) and refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from gguf import TokenType
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)
from transformers import PreTrainedTokenizerFast

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


# SentencePiece's symbol for a space, and the form of its byte pieces.
_SPACE = "▁"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _byte_level_bpe(meta: Dict[str, Any], tokens: Sequence[str]) -> Tuple[Tokenizer, bool]:
    """The "gpt2" model: the file's merges and its named pre-tokenizer; with llama.cpp's default for
    adding BOS."""
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError("the GGUF file has no complete tokenizer (tokenizer.ggml.tokens and .merges)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZATIONS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}: known are {', '.join(sorted(PRE_TOKENIZATIONS))}")
    pre_tokenization = PRE_TOKENIZATIONS[pre]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={text: i for i, text in enumerate(tokens)}, merges=merges))
    if pre_tokenization.normalizer is not None:
        tokenizer.normalizer = pre_tokenization.normalizer()
    tokenizer.pre_tokenizer = pre_tokenization.build()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, pre_tokenization.add_bos


def _check_bpe_scores(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> None:
    """ValueError unless the scores are SentencePiece BPE's: its trainer scores each piece minus its
    rank, while a unigram model's scores are log-probabilities."""
    for text, score, kind in zip(tokens, scores, types):
        if kind == TokenType.NORMAL and not float(score).is_integer():
            raise ValueError(f"its SentencePiece piece {text!r} scores {score}, not a whole number as in a BPE "
                             "model (a unigram model?); only SentencePiece BPE can be converted")


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float],
                        types: Sequence[int]) -> List[Tuple[str, str]]:
    """SentencePiece BPE's merges: each way of cutting a normal piece into two pieces, best scored
    piece first (ties as transformers' SentencePieceExtractor orders them: by the pieces' ids).

    Control, unknown, unused and byte pieces are never merged, as in SentencePiece.
    """
    parts = {text: i for i, (text, kind) in enumerate(zip(tokens, types))
             if kind in (TokenType.NORMAL, TokenType.USER_DEFINED)}
    ranked = []
    for merged, (text, kind) in enumerate(zip(tokens, types)):
        if kind == TokenType.NORMAL:
            ranked += [(-scores[merged], merged, parts[text[:cut]], parts[text[cut:]]) for cut in range(1, len(text))
                       if text[:cut] in parts and text[cut:] in parts]
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, _, left, right in ranked]


def _sentencepiece_bpe(meta: Dict[str, Any], tokens: Sequence[str], types: Sequence[int]) -> Tuple[Tokenizer, bool]:
    """The "llama" model: SentencePiece BPE (see the module doc); llama.cpp adds BOS by default."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("the GGUF tokenizer model 'llama' (SentencePiece) needs a score for every token "
                         "(tokenizer.ggml.scores)")
    byte_pieces = [text for text, kind in zip(tokens, types) if kind == TokenType.BYTE]
    odd = [text for text in byte_pieces if not _BYTE_PIECE.fullmatch(text)]
    if odd:
        raise ValueError(f"its byte token {odd[0]!r} is not of the form <0xNN>")
    _check_bpe_scores(tokens, scores, types)
    unknown_id = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(
        vocab={text: i for i, text in enumerate(tokens)},
        merges=_merges_from_scores(tokens, scores, types),
        unk_token=None if unknown_id is None else tokens[unknown_id],
        fuse_unk=True,  # SentencePiece gives one unknown piece for a run of unknown characters
        byte_fallback=bool(byte_pieces),
    ))
    add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    spaces = normalizers.Replace(" ", _SPACE)
    tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend(_SPACE), spaces]) if add_space_prefix
                            else spaces)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # the prepended space is not the text's
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, True


_KNOWN_TOKEN_TYPES = {TokenType.NORMAL, TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED,
                      TokenType.UNUSED, TokenType.BYTE}

# tokenizer.ggml.model -> how its tokenizer is rebuilt.
_TOKENIZER_MODELS: Dict[str, Callable[..., Tuple[Tokenizer, bool]]] = {
    "gpt2": lambda meta, tokens, types: _byte_level_bpe(meta, tokens),
    "llama": _sentencepiece_bpe,
}


def _token_types(meta: Dict[str, Any], count: int) -> List[int]:
    """``tokenizer.ggml.token_type``, all normal when the file has none; ValueError for an unknown type."""
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [TokenType.NORMAL] * count
    if len(types) != count:
        raise ValueError(f"the GGUF file has {len(types)} token types for {count} tokens")
    unknown = sorted(set(types) - _KNOWN_TOKEN_TYPES)
    if unknown:
        raise ValueError(f"unknown GGUF token type {unknown[0]} (known: 1 normal, 2 unknown, 3 control, "
                         "4 user-defined, 5 unused, 6 byte)")
    return list(types)


def build_tokenizer(meta: Dict[str, Any], model_max_length: int) -> PreTrainedTokenizerFast:
    """The fast tokenizer described by a GGUF file's ``tokenizer.*`` metadata ``meta``: its vocabulary
    and merges (or scores), its normalization and pre-tokenizer, its special tokens and chat template.

    Raises ValueError for a tokenizer model other than byte-level or SentencePiece BPE, an unknown
    pre-tokenizer or token type.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _TOKENIZER_MODELS:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: only 'gpt2' (byte-level BPE) and "
                         "'llama' (SentencePiece BPE) can be converted")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = _token_types(meta, len(tokens))
    tokenizer, default_add_bos = _TOKENIZER_MODELS[kind](meta, tokens, types)
    # Control (and unknown) tokens are special: never split, dropped by decode(skip_special_tokens=True);
    # user-defined ones are never split but are text.
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text, token_type
                                  in zip(tokens, types) if token_type in (TokenType.CONTROL, TokenType.UNKNOWN)])
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False)
                          for text, token_type in zip(tokens, types) if token_type == TokenType.USER_DEFINED])

    def token(key: str) -> Optional[str]:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[token_id]

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        def sequence(name: str, type_id: int) -> List[str]:
            return [f"{bos}:{type_id}"] * add_bos + [f"${name}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos

        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(sequence("A", 0)),
            pair=" ".join(sequence("A", 0) + sequence("B", 1)),
            special_tokens=[(text, meta[f"tokenizer.ggml.{key}_token_id"])
                            for text, key, added in ((bos, "bos", add_bos), (eos, "eos", add_eos)) if added],
        )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding"),
        # Saved into tokenizer_config.json, where LlamaTokenizerFast reads them.
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        model_max_length=model_max_length,
        # Llama's forward() takes no token_type_ids; without this the tokenizer returns them
        # and generate(**tokenizer(text)) fails.
        model_input_names=["input_ids", "attention_mask"],
        # The default (True) rewrites " ," to "," and so on, breaking decode(encode(s)) == s.
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = meta.get("tokenizer.chat_template")
    return wrapped
