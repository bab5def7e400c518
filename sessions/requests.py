"""What a client asks of a session and what it gets back: plain data, no torch, no petals.

The wire parsers (``handlers/``) build these; the session side (``sessions/``) runs them.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

# Below this temperature sampling is greedy: dividing the logits by a far smaller number
# overflows them, and the token is the most likely one anyway.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen: greedy by default, or sampled with the usual warpers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None  # drop tokens less likely than this fraction of the likeliest one
    repetition_penalty: Optional[float] = None  # on every token of the session (transformers' meaning)
    # OpenAI's penalties, on the tokens this generation chose: frequency per occurrence, presence once.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Tuple[Tuple[int, float], ...] = ()  # (token id, added to its logit)
    seed: Optional[int] = None  # the same seed, prompt and parameters give the same tokens
    json_schema: Optional[str] = None  # the output must be JSON valid against this schema (JSON text)
    lark_grammar: Optional[str] = None  # the output must follow this grammar (llguidance's Lark dialect)
    logprobs: Optional[int] = None  # report each chosen token's log-probability and this many alternatives

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is taken rather than sampled."""
        return not self.do_sample or self.temperature < MIN_SAMPLING_TEMPERATURE


@dataclass(frozen=True)
class TokenLogprob:
    """A token's text and its log-probability under the model (before any sampling setting)."""

    text: str
    logprob: float


@dataclass(frozen=True)
class ChosenTokenLogprobs:
    """The log-probabilities at one step: the chosen token's, and the likeliest alternatives'."""

    chosen: TokenLogprob
    top: Tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: new input text, length limits, sampling, and when to stop streaming."""

    inputs: Optional[str] = None
    input_ids: Optional[Tuple[int, ...]] = None  # ``inputs`` already tokenized (to size its session)
    cached_tokens: int = 0  # prompt tokens a warm session already holds, left out of ``input_ids``
    max_length: Optional[int] = None  # total tokens in the session, prefix included
    max_new_tokens: Optional[int] = None  # tokens per reply
    sampling: SamplingParams = SamplingParams()
    stop_sequence: Optional[str] = None  # stream replies until the text contains it
    extra_stop_sequences: Tuple[str, ...] = ()  # also end the stream (with a stop_sequence: as its token)
    format_stop_sequences: Tuple[str, ...] = ()  # the chat format's own ends of a turn (not the client's to count)
    until_length: bool = False  # keep replying until a stop, EOS or max_length, even without stop_sequence
    visible_text: bool = False  # also give each reply's text with stop sequences cut and held back
    trace_route: bool = False  # the last reply carries the generation's route through the swarm
    prediction: Optional[str] = None  # text the output is expected to resemble: drafts are taken from it
    from_position: Optional[int] = None  # first cut the session's conversation back to this many tokens
    speculative: bool = True  # steps may verify drafts (the output is the same either way)
    choices: int = 1  # samples of the same prompt, each a row of one session (sessions.engine.rows)

    @property
    def streaming(self) -> bool:
        """Whether replies continue until a stop condition rather than after the first one."""
        return self.stop_sequence is not None or self.until_length

    @property
    def client_stop_sequences(self) -> Tuple[str, ...]:
        """The texts the client asked to end the generation."""
        return tuple(filter(None, (self.stop_sequence, *self.extra_stop_sequences)))

    @property
    def stop_sequences(self) -> Tuple[str, ...]:
        """Every text that ends the generation: the client's and its chat format's."""
        return tuple(dict.fromkeys((*self.client_stop_sequences, *filter(None, self.format_stop_sequences))))


@dataclass(frozen=True)
class PredictionTokens:
    """How many tokens drafted from a request's ``prediction`` the model took, and turned down."""

    accepted: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class GenerationUpdate:
    """One reply of a generation: the new text, whether it is the generation's last, and its token count.

    ``text`` is the part of the output that is safe to show: stop sequences and anything
    after them cut, and a possible beginning of one held back until the next reply.
    """

    outputs: str
    last: bool  # the generation ends with it (the wire's ``stop: true``)
    token_count: int
    finish_reason: Optional[str] = None  # on the last reply: "stop" (stop text or EOS), "length", "cancelled"
    text: str = ""
    stop_sequence: Optional[str] = None  # on the last reply: the stop sequence that ended it (not EOS or a limit)
    logprobs: Tuple[ChosenTokenLogprobs, ...] = ()  # per token of ``outputs``, when the request asked
    route: Optional[Dict[str, Any]] = None  # on the last reply, when the request asked: the route trace
    prediction_tokens: Optional[PredictionTokens] = None  # on the last reply, when steps verified drafts
    session_length: Optional[int] = None  # on the last reply: tokens in the session's conversation now
    row: int = 0  # which of the request's choices (0 to choices - 1) it belongs to; its ``last`` ends that one

    @property
    def stopped_by_sequence(self) -> bool:
        """Whether a stop sequence (not EOS or a limit) ended the generation."""
        return self.stop_sequence is not None
