"""Turning generated token ids into text, piece by piece, the way a stream must send it."""

from typing import List, Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDecoder:
    """Decodes the tokens of one session into text deltas.

    Decoding each new token alone loses SentencePiece's leading spaces and splits multi-byte
    characters; so every delta is the difference between decoding a short window with and
    without the new tokens, the window starting at a token already turned into text. Text
    that ends in a partial character is held back until a later token completes it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        # A fast tokenizer's own decoder gives the same text (no clean-up asked for) without the
        # wrapper's checks of every id, a cost paid twice per generated token.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._window: List[int] = []  # tokens from the window's start on
        self._read_offset = 0  # in the window: where the tokens not yet turned into text begin

    def _decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add_context(self, token_ids: Sequence[int]) -> None:
        """Tokens the client sent: they anchor what follows but produce no output.

        Output held back for an incomplete character is dropped: new input ends it.
        """
        if token_ids:
            self._window = [token_ids[-1]]
            self._read_offset = 1

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds generated tokens; returns the text they complete (may be empty)."""
        self._window.extend(token_ids)
        prefix_text = self._decode(self._window[: self._read_offset])
        full_text = self._decode(self._window)
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHARACTER):
            return ""
        # The tokens just read become the next window's context.
        self._window = self._window[self._read_offset:]
        self._read_offset = len(self._window)
        return full_text[len(prefix_text):]
