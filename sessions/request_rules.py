"""The rules a generation request must follow, the same on every API.

The wire parsers (``handlers/protocol.py`` for the native APIs, ``handlers/openai_protocol.py``
for ``/v1``) read their fields' ranges from here, and the session manager checks a request
against its model's limits with the functions below before any of it is tokenized.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional

from model_specs import ModelSpec
from sessions.errors import InvalidRequest, MaxLengthExceeded
from sessions.requests import GenerationRequest

# Stop sequences of one generation, and the length of each: every generated character is
# checked against each of them.
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 1000


@dataclass(frozen=True)
class Bounds:
    """The values a numeric field may take: from ``low`` (included or not) up to ``high``."""

    low: float
    high: float = math.inf
    low_inclusive: bool = True

    def __contains__(self, value: float) -> bool:
        above_low = value >= self.low if self.low_inclusive else value > self.low
        return above_low and value <= self.high

    def __str__(self) -> str:
        high = "inf)" if math.isinf(self.high) else f"{self.high:g}]"
        return f"{'[' if self.low_inclusive else '('}{self.low:g}, {high}"

    def field_limits(self) -> Dict[str, float]:
        """The bounds as pydantic's ``Field`` arguments."""
        limits = {"ge" if self.low_inclusive else "gt": self.low}
        if not math.isinf(self.high):
            limits["le"] = self.high
        return limits


TEMPERATURE = Bounds(0.0, 2.0)  # 0: greedy
TOP_P = Bounds(0.0, 1.0, low_inclusive=False)
TOP_K = Bounds(-1)  # 0 or -1: off
MIN_P = Bounds(0.0, 1.0)
REPETITION_PENALTY = Bounds(0.0, 10.0, low_inclusive=False)  # 1: off
PRESENCE_PENALTY = FREQUENCY_PENALTY = Bounds(-2.0, 2.0)


def top_k_or_none(top_k: Optional[int]) -> Optional[int]:
    """``top_k`` as sampling takes it: None when it is off (absent, 0 or -1)."""
    return top_k if top_k is not None and top_k > 0 else None


def check_session_length(spec: ModelSpec, max_length: int) -> None:
    """Raises if a session of ``max_length`` tokens is longer than the model allows."""
    limit = spec.chat.max_session_length
    if max_length > limit:
        raise InvalidRequest(f"max_length {max_length} exceeds this model's maximum session length {limit}")

def check_text_length(text: str, max_tokens: int, max_token_chars: int) -> None:
    """Raises if ``text`` cannot be ``max_tokens`` tokens or fewer: checked before tokenizing it."""
    if len(text) > max_tokens * max_token_chars:
        raise MaxLengthExceeded(f"Maximum length exceeded: {len(text)} characters are more than "
                                f"{max_tokens} tokens of this model can hold")

def check_request(spec: ModelSpec, request: GenerationRequest) -> None:
    """Raises if one generation asks for more new tokens or stop sequences than allowed."""
    limit = spec.max_new_tokens_limit
    if request.max_new_tokens is not None and request.max_new_tokens > limit:
        raise InvalidRequest(f"max_new_tokens {request.max_new_tokens} exceeds this model's limit of {limit}")
    stops = request.client_stop_sequences
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"{len(stops)} stop sequences given; at most {MAX_STOP_SEQUENCES} are allowed")
    if any(len(stop) > MAX_STOP_SEQUENCE_CHARS for stop in stops):
        raise InvalidRequest(f"A stop sequence may be at most {MAX_STOP_SEQUENCE_CHARS} characters long")

def check_new_tokens(spec: ModelSpec, request: GenerationRequest) -> None:
    """Raises if a request whose prompt is tokenized (``input_ids``) may generate more new tokens
    than the model allows: with no ``max_new_tokens`` bounding its one reply, it goes on up to
    ``max_length``, prompt included."""
    if request.max_length is None or (request.max_new_tokens is not None and not request.streaming):
        return
    limit, prompt_tokens = spec.max_new_tokens_limit, len(request.input_ids or ())
    new_tokens = request.max_length - prompt_tokens
    if new_tokens > limit:
        raise InvalidRequest(f"max_length {request.max_length} leaves room for {new_tokens} new tokens after "
                             f"the prompt's {prompt_tokens}, more than this model's limit of {limit} new tokens "
                             "per request; lower max_length or set max_new_tokens")
