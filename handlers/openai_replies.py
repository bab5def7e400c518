"""Every reply of the ``/v1`` API, declared once as typed models, and the builders that make a
request's replies from its generation updates.

A model's fields are written in the order declared; those named in ``OMITTED_WHEN_NONE`` are
left out when None (a chunk's ``usage``, a reply's ``route``), the rest are written as null
when None, as OpenAI's replies have them (``logprobs``, ``finish_reason``, a tool call's
``content``). A request's builder (``CompletionReplies``, ``ChatReplies``) holds what its
replies depend on, and what one streamed chunk must know of the ones before it.
"""

import itertools
import uuid
from typing import Any, ClassVar, Dict, FrozenSet, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from handlers.openai_tools import new_call_id, openai_tool_call
from sessions.formats.tool_syntax import CallDelta, CallStreamer, ToolSyntax
from sessions.requests import ChosenTokenLogprobs, GenerationUpdate, PredictionTokens, TokenLogprob

# OpenAI's replies name the backend configuration that produced them; ours is this server.
SYSTEM_FINGERPRINT = "fp_swarm_chat"


class WireModel(BaseModel):
    """A reply or a part of one, as the wire has it."""

    OMITTED_WHEN_NONE: ClassVar[FrozenSet[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, serialize: SerializerFunctionWrapHandler) -> Dict[str, Any]:
        data = serialize(self)
        for name in self.OMITTED_WHEN_NONE:
            if data.get(name, False) is None:
                del data[name]
        return data

    def json_text(self) -> str:
        """The model as JSON text."""
        return self.model_dump_json()


class ModelCard(WireModel):
    """One model of ``GET /v1/models``: OpenAI's fields, and vLLM's ``root`` and ``max_model_len``
    (the most tokens a session holds, prompt and reply) with what the model supports here."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    root: str
    max_model_len: int
    max_output_tokens: int
    capabilities: List[str]


class ModelList(WireModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: List[ModelCard]


class PromptTokensDetails(WireModel):
    cached_tokens: int  # prompt tokens a warm session already held


class CompletionTokensDetails(WireModel):
    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class Usage(WireModel):
    """Token counts as OpenAI reports them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
           prediction: Optional[PredictionTokens]) -> "Usage":
        """The usage of a reply: ``cached_tokens`` of its prompt a warm session held, and the
        tokens of its prediction the model took and turned down."""
        prediction = prediction or PredictionTokens()
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
                   completion_tokens_details=CompletionTokensDetails(
                       accepted_prediction_tokens=prediction.accepted,
                       rejected_prediction_tokens=prediction.rejected))


class CompletionLogprobs(WireModel):
    """``/v1/completions``' log-probabilities: parallel lists, one entry per token."""

    tokens: List[str]
    token_logprobs: List[float]
    top_logprobs: List[Dict[str, float]]
    text_offset: List[int]


class TokenLogprobEntry(WireModel):
    token: str
    logprob: float
    bytes: List[int]

    @classmethod
    def of(cls, token: TokenLogprob) -> "TokenLogprobEntry":
        return cls(token=token.text, logprob=token.logprob, bytes=list(token.text.encode()))


class ChosenTokenEntry(TokenLogprobEntry):
    top_logprobs: List[TokenLogprobEntry]


class ChatLogprobs(WireModel):
    """Chat completions' log-probabilities: one entry per token, with its alternatives."""

    content: List[ChosenTokenEntry]

    @classmethod
    def of(cls, logprobs: Optional[Sequence[ChosenTokenLogprobs]]) -> Optional["ChatLogprobs"]:
        if logprobs is None:
            return None
        return cls(content=[ChosenTokenEntry(token=step.chosen.text, logprob=step.chosen.logprob,
                                             bytes=list(step.chosen.text.encode()),
                                             top_logprobs=[TokenLogprobEntry.of(top) for top in step.top])
                            for step in logprobs])


class FunctionCall(WireModel):
    name: str
    arguments: str  # JSON text


class ToolCall(WireModel):
    """A call of one of the request's tools (``index``: in a streamed delta only)."""

    OMITTED_WHEN_NONE = frozenset({"index"})

    index: Optional[int] = None
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDelta(WireModel):
    """What one streamed piece adds to a call's function: its name (in the first) and argument text."""

    OMITTED_WHEN_NONE = frozenset({"name"})

    name: Optional[str] = None
    arguments: str = ""


class ToolCallDelta(WireModel):
    """A streamed piece of a tool call: the first has its id, type and name, the next ones more
    of its arguments' text, as the model writes them."""

    OMITTED_WHEN_NONE = frozenset({"id", "type"})

    index: int = 0
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionDelta


class AssistantMessage(WireModel):
    """A chat reply's message: its text, or the tool calls it makes (``content`` null)."""

    OMITTED_WHEN_NONE = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[List[ToolCall]] = None


class ChatDelta(WireModel):
    """What one streamed chunk adds to the chat reply's message."""

    OMITTED_WHEN_NONE = frozenset({"role", "content", "tool_calls"})

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[List[ToolCallDelta]] = None


class CompletionChoice(WireModel):
    index: int = 0
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[str]


class ChatChoice(WireModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[str]


class ChatChunkChoice(WireModel):
    index: int = 0
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[str]


class Envelope(WireModel):
    """What every reply and chunk has; ``route`` is our extension (the trace a request asked for)."""

    OMITTED_WHEN_NONE = frozenset({"usage", "route"})

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    usage: Optional[Usage] = None
    route: Optional[Dict[str, Any]] = None


class Completion(Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: List[CompletionChoice]


class ChatCompletion(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: List[ChatChoice]


class ChatCompletionChunk(Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: List[ChatChunkChoice]


def openai_finish_reason(update: GenerationUpdate) -> str:
    """OpenAI's ``finish_reason`` for the last reply of a generation."""
    return "length" if update.finish_reason == "length" and not update.stopped_by_sequence else "stop"


class CompletionReplies:
    """The replies to one ``/v1/completions`` request: the whole reply, or a stream's chunks.

    ``wants_logprobs``: the request asked for log-probabilities; ``text_offset``: where the
    reply's text starts, counted as completions' logprobs count it (after the prompt).
    """

    id_prefix = "cmpl-"
    reply_model = chunk_model = Completion  # a completions stream's chunks have its replies' shape

    def __init__(self, model: str, created: int, wants_logprobs: bool, text_offset: int = 0):
        self.completion_id = self.id_prefix + uuid.uuid4().hex[:24]
        self.model = model
        self.created = created
        self.wants_logprobs = wants_logprobs
        self.text_offset = text_offset
        self.index = 0  # which of the request's choices its replies are (n > 1: a builder per choice)

    def as_choice(self, first: "CompletionReplies", index: int) -> "CompletionReplies":
        """Makes this builder's replies those of choice ``index`` of the request ``first`` answers
        (its id and time); each choice keeps its own streaming state. Returns this builder."""
        self.completion_id, self.created, self.index = first.completion_id, first.created, index
        return self

    def choice(self, text: str, finish_reason: Optional[str],
               logprobs: Sequence[ChosenTokenLogprobs]) -> Union[CompletionChoice, ChatChoice]:
        """The one choice of a whole reply."""
        return CompletionChoice(text=text, logprobs=self.completion_logprobs(logprobs), finish_reason=finish_reason)

    def chunk_choice(self, text: str, finish_reason: Optional[str], first: bool,
                     logprobs: Sequence[ChosenTokenLogprobs]) -> Union[CompletionChoice, ChatChunkChoice]:
        """The one choice of a streamed chunk."""
        return self.choice(text, finish_reason, logprobs)

    def completion_logprobs(self, logprobs: Sequence[ChosenTokenLogprobs]) -> Optional[CompletionLogprobs]:
        if not self.wants_logprobs:
            return None
        offsets = list(itertools.accumulate((len(step.chosen.text) for step in logprobs[:-1]),
                                            initial=self.text_offset))
        self.text_offset += sum(len(step.chosen.text) for step in logprobs)
        return CompletionLogprobs(tokens=[step.chosen.text for step in logprobs],
                                  token_logprobs=[step.chosen.logprob for step in logprobs],
                                  top_logprobs=[{top.text: top.logprob for top in step.top} for step in logprobs],
                                  text_offset=offsets)

    def whole_choice(self, text: str, last: GenerationUpdate,
                     logprobs: Sequence[ChosenTokenLogprobs]) -> Union[CompletionChoice, ChatChoice]:
        """This builder's choice of the whole reply, once its ``last`` update came."""
        choice = self.choice(text, openai_finish_reason(last), logprobs)
        choice.index = self.index
        return choice

    def reply_of(self, choices: Sequence[Union[CompletionChoice, ChatChoice]], usage: Usage,
                 route: Optional[Dict[str, Any]]) -> Envelope:
        """The whole reply with ``choices`` (each of its own builder's ``whole_choice``)."""
        return self.reply_model(id=self.completion_id, created=self.created, model=self.model, usage=usage,
                                route=route, choices=list(choices))

    def chunk(self, update: GenerationUpdate, first: bool, logprobs: Sequence[ChosenTokenLogprobs]) -> Envelope:
        """The chunk that streams ``update``'s text."""
        finish_reason = openai_finish_reason(update) if update.last else None
        choice = self.chunk_choice(update.text, finish_reason, first, logprobs)
        choice.index = self.index
        return self.chunk_model(id=self.completion_id, created=self.created, model=self.model, route=update.route,
                                choices=[choice])

    def usage_chunk(self, usage: Usage) -> Envelope:
        """The last chunk of a stream whose request asked for usage: no choices."""
        return self.chunk_model(id=self.completion_id, created=self.created, model=self.model, usage=usage,
                                choices=[])


class ChatReplies(CompletionReplies):
    """The replies to one ``/v1/chat/completions`` request. With tools it may call
    (``tool_syntax``: how the model writes a call), a reply that begins like a call is sent
    as a tool call: streamed, its name once written, then its arguments as they are written."""

    id_prefix = "chatcmpl-"
    reply_model = ChatCompletion
    chunk_model = ChatCompletionChunk

    def __init__(self, model: str, created: int, wants_logprobs: bool, tool_syntax: Optional[ToolSyntax]):
        super().__init__(model, created, wants_logprobs)
        self.tool_syntax = tool_syntax  # None: no tool may be called
        self.calling: Optional[bool] = None  # streaming: whether the reply is a tool call (known from its start)
        self.call: Optional[CallStreamer] = None  # streaming a call: what of it was told
        self.call_id = new_call_id()

    def choice(self, text: str, finish_reason: Optional[str], logprobs: Sequence[ChosenTokenLogprobs]) -> ChatChoice:
        call = self.tool_syntax.parse(text) if self.tool_syntax is not None else None
        if call is not None:
            message = AssistantMessage(content=None, tool_calls=[ToolCall(**openai_tool_call(call))])
            finish_reason = "tool_calls"
        else:
            message = AssistantMessage(content=text)
        return ChatChoice(message=message, logprobs=self.chat_logprobs(logprobs), finish_reason=finish_reason)

    def chunk_choice(self, text: str, finish_reason: Optional[str], first: bool,
                     logprobs: Sequence[ChosenTokenLogprobs]) -> ChatChunkChoice:
        role = "assistant" if first else None
        delta = ChatDelta(role=role, content=text)
        if self.tool_syntax is not None:
            if self.calling is None and text:
                self.calling = self.tool_syntax.starts_call(text)  # free text never begins like a call
                self.call = self.tool_syntax.streamer() if self.calling else None
            if self.calling:
                delta = ChatDelta(role=role)
                news = self.call.push(text)
                if finish_reason is not None:
                    call, rest = self.call.finish()
                    news = CallDelta(news.name or rest.name, news.arguments + rest.arguments)
                    if call is not None:
                        finish_reason = "tool_calls"
                    elif self.call.name is None:
                        delta.content = self.call.text  # cut short before it named a function: the text as written
                if news.name is not None or news.arguments:
                    delta.tool_calls = [self.tool_call_delta(news)]
        return ChatChunkChoice(delta=delta, logprobs=self.chat_logprobs(logprobs), finish_reason=finish_reason)

    def tool_call_delta(self, news: CallDelta) -> ToolCallDelta:
        """The streamed piece of the call that tells ``news``: the first names the call."""
        if news.name is None:
            return ToolCallDelta(function=FunctionDelta(arguments=news.arguments))
        return ToolCallDelta(id=self.call_id, type="function",
                             function=FunctionDelta(name=news.name, arguments=news.arguments))

    def chat_logprobs(self, logprobs: Sequence[ChosenTokenLogprobs]) -> Optional[ChatLogprobs]:
        return ChatLogprobs.of(logprobs) if self.wants_logprobs else None
