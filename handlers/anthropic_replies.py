"""Every reply of Anthropic's Messages API (``/v1/messages``) as typed models, and the builder
that makes a request's reply, or its stream of events, from its generation updates.

A stream is the events Anthropic's clients read: ``message_start``, then per content block
``content_block_start``, its ``content_block_delta``s and ``content_block_stop``, then
``message_delta`` (the stop reason, the usage) and ``message_stop``. A reply that calls a tool
streams a ``tool_use`` block: started once the function's name is written, then its input as
``input_json_delta``s as the model writes the arguments. The whole reply is what the events add
up to, made by the same builder (but for a call cut short by the token limit: the whole reply
has its text, which is no call).
"""

import uuid
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from handlers.openai_replies import WireModel
from sessions.formats.tool_syntax import CallDelta, CallStreamer, ParsedCall, ToolSyntax
from sessions.requests import GenerationUpdate


def new_id(prefix: str) -> str:
    """A new id of a message (``msg_``) or of a tool call (``toolu_``)."""
    return prefix + uuid.uuid4().hex[:24]


class TextBlock(WireModel):
    type: Literal["text"] = "text"
    text: str = ""


class ToolUseBlock(WireModel):
    """A call of one of the request's tools; ``input`` is empty in a stream's start of the block."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: Dict[str, Any] = {}


ContentBlock = Union[TextBlock, ToolUseBlock]


class Usage(WireModel):
    """Token counts as Anthropic reports them: ``input_tokens`` are the prompt's tokens that a warm
    session did not already hold (``cache_read_input_tokens``); nothing is written to a cache
    that costs extra (``cache_creation_input_tokens``)."""

    input_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int
    output_tokens: int


class Message(WireModel):
    """The whole reply; ``route`` is our extension (the trace a request asked for)."""

    OMITTED_WHEN_NONE = frozenset({"route"})

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: List[ContentBlock]
    stop_reason: Optional[str] = None
    stop_sequence: Optional[str] = None
    usage: Usage
    route: Optional[Dict[str, Any]] = None


class MessageStart(WireModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStart(WireModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDelta(WireModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJSONDelta(WireModel):
    """More of a tool call's input: JSON text, whose pieces join to the input's JSON."""

    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDelta(WireModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Union[TextDelta, InputJSONDelta]


class ContentBlockStop(WireModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class StopDelta(WireModel):
    stop_reason: str
    stop_sequence: Optional[str]


class MessageDelta(WireModel):
    """The end of the reply: why it stopped, and its usage (cumulative, as Anthropic sends it)."""

    OMITTED_WHEN_NONE = frozenset({"route"})

    type: Literal["message_delta"] = "message_delta"
    delta: StopDelta
    usage: Usage
    route: Optional[Dict[str, Any]] = None


class MessageStop(WireModel):
    type: Literal["message_stop"] = "message_stop"


Event = Union[MessageStart, ContentBlockStart, ContentBlockDelta, ContentBlockStop, MessageDelta, MessageStop]


def stop_reason(update: GenerationUpdate, client_stops: Sequence[str]) -> str:
    """Anthropic's ``stop_reason`` for the last update of a reply that is no tool call: a stop
    sequence of the client's, the token limit, or the end of the model's turn (its end-of-turn
    text or end of sequence)."""
    if update.stop_sequence is not None and update.stop_sequence in client_stops:
        return "stop_sequence"
    if update.finish_reason == "length":
        return "max_tokens"
    return "end_turn"


class MessageReplies:
    """The reply to one ``/v1/messages`` request, built from its updates (``events``): each
    update's events, and the whole reply they add up to (``message``).

    With tools it may call (``tool_syntax``: how the model writes a call), a reply that begins
    like a call is a ``tool_use`` block; ``client_stops``: the request's ``stop_sequences``.
    """

    def __init__(self, model: str, tool_syntax: Optional[ToolSyntax], client_stops: Sequence[str]):
        self.model = model
        self.message_id = new_id("msg_")
        self.prompt_tokens = self.cached_tokens = 0
        self.output_tokens = 0
        self.tool_syntax = tool_syntax
        self.client_stops = tuple(client_stops)
        self.content: List[ContentBlock] = []
        self.open_block = False  # whether the last block of ``content`` is still being written
        self.call: Optional[CallStreamer] = None  # the reply is a call: what of it was told
        self.started = False
        self.last: Optional[GenerationUpdate] = None
        self.parsed_call: Optional[ParsedCall] = None

    def usage(self) -> Usage:
        """The tokens of the reply so far."""
        return Usage(input_tokens=self.prompt_tokens - self.cached_tokens, cache_read_input_tokens=self.cached_tokens,
                     output_tokens=self.output_tokens)

    def events(self, update: GenerationUpdate, prompt_tokens: int, cached_tokens: int) -> List[Event]:
        """The events that stream ``update`` (the first ones start the message), of a prompt of
        ``prompt_tokens`` of which a warm session held ``cached_tokens``."""
        self.prompt_tokens, self.cached_tokens = prompt_tokens, cached_tokens
        events: List[Event] = []
        if not self.started:
            self.started = True
            events.append(MessageStart(message=self.message(content=[])))
        self.output_tokens += update.token_count
        if self.call is None and not self.content and update.text and self.tool_syntax is not None \
                and self.tool_syntax.starts_call(update.text):  # free text never begins like a call
            self.call = self.tool_syntax.streamer()
        if self.call is not None:
            events += self._call_events(self.call.push(update.text))
        elif update.text:
            events += self._text_events(update.text)
        if update.last:
            events += self._finish(update)
        return events

    def _text_events(self, text: str) -> List[Event]:
        events: List[Event] = []
        if not self.open_block:
            events.append(self._start_block(TextBlock()))
        self.content[-1].text += text
        events.append(ContentBlockDelta(index=len(self.content) - 1, delta=TextDelta(text=text)))
        return events

    def _call_events(self, news: CallDelta) -> List[Event]:
        events: List[Event] = []
        if news.name is not None:
            events.append(self._start_block(ToolUseBlock(id=new_id("toolu_"), name=news.name)))
        if news.arguments:
            events.append(ContentBlockDelta(index=len(self.content) - 1,
                                            delta=InputJSONDelta(partial_json=news.arguments)))
        return events

    def _start_block(self, block: ContentBlock) -> ContentBlockStart:
        self.content.append(block)
        self.open_block = True
        return ContentBlockStart(index=len(self.content) - 1, content_block=block.model_copy())

    def _finish(self, update: GenerationUpdate) -> List[Event]:
        self.last = update
        events: List[Event] = []
        if self.call is not None:
            self.parsed_call, rest = self.call.finish()
            if self.call.name is None:  # cut short before it named a function: the text as written
                events += self._text_events(self.call.text)
            else:
                events += self._call_events(rest)
                if self.parsed_call is not None:
                    self.content[-1].input = self.parsed_call.arguments
                else:  # cut short (max_tokens): the whole reply says the text as written
                    self.content[-1] = TextBlock(text=self.call.text)
        if self.open_block:
            events.append(ContentBlockStop(index=len(self.content) - 1))
            self.open_block = False
        final = self.message()
        events += [MessageDelta(delta=StopDelta(stop_reason=final.stop_reason, stop_sequence=final.stop_sequence),
                                usage=final.usage, route=update.route),
                   MessageStop()]
        return events

    def message(self, content: Optional[List[ContentBlock]] = None) -> Message:
        """The reply as it stands (whole once the last update came); ``content`` given: the
        message a stream starts with."""
        reason = sequence = None
        if self.last is not None:
            reason = "tool_use" if self.parsed_call is not None else stop_reason(self.last, self.client_stops)
            sequence = self.last.stop_sequence if reason == "stop_sequence" else None
        return Message(id=self.message_id, model=self.model, content=self.content if content is None else content,
                       stop_reason=reason, stop_sequence=sequence, usage=self.usage(),
                       route=self.last.route if self.last is not None else None)
