"""Every reply of ``/v1/responses``, declared once: the response object, its output items, and the
typed events of a stream, built from a generation's updates by one ``ResponseReplies`` per request.

A reply is an output message (its text as one ``output_text`` part) or, when the request's tools
may be called and the reply begins like a call, a ``function_call`` item. Streamed, a call's item
is announced once the model has written the function's name, and its arguments follow as
``response.function_call_arguments.delta`` events while the model writes them.
"""

import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import Field

from handlers.openai_replies import WireModel
from handlers.openai_tools import new_call_id
from sessions.formats.tool_syntax import CallDelta, CallStreamer, ToolSyntax
from sessions.requests import GenerationUpdate


def new_id(prefix: str) -> str:
    """A new id of an object of the kind ``prefix`` names (``resp``, ``msg``, ``fc``)."""
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputText(WireModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: List[Any] = Field(default_factory=list)
    logprobs: List[Any] = Field(default_factory=list)


class OutputMessage(WireModel):
    """A reply's text."""

    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: List[OutputText]


class FunctionCallItem(WireModel):
    """A call of one of the request's function tools; ``arguments`` is JSON text."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Union[OutputMessage, FunctionCallItem]


class InputTokensDetails(WireModel):
    cached_tokens: int  # of the input, those a warm session already held


class OutputTokensDetails(WireModel):
    reasoning_tokens: int = 0


class ResponseUsage(WireModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int, cached_tokens: int) -> "ResponseUsage":
        return cls(input_tokens=input_tokens, input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
                   output_tokens=output_tokens, total_tokens=input_tokens + output_tokens)


class IncompleteDetails(WireModel):
    reason: Literal["max_output_tokens"]


class Response(WireModel):
    """The response object: what ``POST`` answers, a stream's lifecycle events carry, and ``GET`` returns."""

    OMITTED_WHEN_NONE = frozenset({"route"})

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: Optional[Dict[str, Any]] = None
    incomplete_details: Optional[IncompleteDetails] = None
    instructions: Optional[str]
    max_output_tokens: Optional[int]
    model: str
    output: List[OutputItem]
    parallel_tool_calls: bool = False
    previous_response_id: Optional[str]
    temperature: Optional[float]
    top_p: Optional[float]
    tool_choice: Any
    tools: List[Dict[str, Any]]
    text: Dict[str, Any]
    truncation: Literal["disabled"] = "disabled"
    store: bool
    metadata: Dict[str, str]
    usage: Optional[ResponseUsage] = None
    user: Optional[str] = None
    route: Optional[Dict[str, Any]] = None  # our extension, as on /v1's other replies


class ResponseReplies:
    """The replies to one ``/v1/responses`` request: a stream's events, and the whole response they
    add up to (``response``, once ``finished``).

    ``response`` is the response as it starts (in progress, no output); ``tool_syntax`` says how
    the model writes a call, when the request's tools may be called (None: they may not).
    """

    def __init__(self, response: Response, tool_syntax: Optional[ToolSyntax]):
        self.response = response
        self.tool_syntax = tool_syntax
        self.sequence_number = 0
        self.item: Optional[OutputItem] = None  # the output item being streamed
        self.call: Optional[CallStreamer] = None  # when that item is a call: what of it was told
        self.text = ""  # the reply's text so far

    @classmethod
    def starting(cls, response_id: str, model: str, request: Any, tool_syntax: Optional[ToolSyntax]
                 ) -> "ResponseReplies":
        """The replies of ``request`` (a ``ResponseRequest``), its response in progress."""
        text_format = request.text.format if request.text is not None and request.text.format is not None else None
        response = Response(
            id=response_id, created_at=int(time.time()), status="in_progress", instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, model=model, output=[],
            parallel_tool_calls=bool(request.parallel_tool_calls), previous_response_id=request.previous_response_id,
            temperature=request.temperature, top_p=request.top_p,
            tool_choice=(request.tool_choice.model_dump() if hasattr(request.tool_choice, "model_dump")
                         else request.tool_choice or "auto"),
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools or ()],
            text={"format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format is not None
                  else {"type": "text"}},
            store=request.store, metadata=request.metadata or {}, user=request.user)
        return cls(response, tool_syntax)

    def event(self, event_type: str, **fields: Any) -> Dict[str, Any]:
        """One event of the stream, numbered in order."""
        self.sequence_number += 1
        return {"type": event_type, "sequence_number": self.sequence_number - 1, **fields}

    def _dump(self, model: WireModel) -> Dict[str, Any]:
        return model.model_dump(mode="json")

    def started(self) -> List[Dict[str, Any]]:
        """The events that open a stream."""
        return [self.event("response.created", response=self._dump(self.response)),
                self.event("response.in_progress", response=self._dump(self.response))]

    def is_call(self, text: str) -> bool:
        return self.tool_syntax is not None and self.tool_syntax.starts_call(text)

    def push(self, text: str) -> List[Dict[str, Any]]:
        """The events that stream ``text``, the reply's next piece."""
        if not text:
            return []
        events = []
        if self.item is None and not self.text:
            if self.is_call(text):
                self.call = self.tool_syntax.streamer()
            else:
                events += self._open_message()
        self.text += text
        if self.call is not None:
            return events + self._call_news(self.call.push(text))
        return events + [self.event("response.output_text.delta", item_id=self.item.id, output_index=0,
                                    content_index=0, delta=text, logprobs=[])]

    def _open_message(self) -> List[Dict[str, Any]]:
        self.item = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        return [self.event("response.output_item.added", output_index=0, item=self._dump(self.item)),
                self.event("response.content_part.added", item_id=self.item.id, output_index=0, content_index=0,
                           part=self._dump(OutputText(text="")))]

    def _call_news(self, news: CallDelta) -> List[Dict[str, Any]]:
        events = []
        if news.name is not None:
            self.item = FunctionCallItem(id=new_id("fc"), call_id=new_call_id(), name=news.name, arguments="",
                                         status="in_progress")
            events.append(self.event("response.output_item.added", output_index=0, item=self._dump(self.item)))
        if news.arguments:
            self.item.arguments += news.arguments
            events.append(self.event("response.function_call_arguments.delta", item_id=self.item.id,
                                     output_index=0, delta=news.arguments))
        return events

    def finished(self, last: GenerationUpdate, usage: ResponseUsage) -> List[Dict[str, Any]]:
        """The events that close a stream, once the generation's ``last`` update was pushed."""
        events = []
        if self.call is not None:
            call, rest = self.call.finish()
            if self.item is None and call is None:  # cut short before it named a function: the text as written
                self.call = None
                events += self._open_message()
                events.append(self.event("response.output_text.delta", item_id=self.item.id, output_index=0,
                                         content_index=0, delta=self.text, logprobs=[]))
            else:
                events += self._call_news(rest)
        if self.item is None:  # nothing was written
            events += self._open_message()
        status = self._status(last)
        if isinstance(self.item, FunctionCallItem):
            self.item.status = status
            events.append(self.event("response.function_call_arguments.done", item_id=self.item.id, output_index=0,
                                     name=self.item.name, arguments=self.item.arguments))
        else:
            part = OutputText(text=self.text)
            self.item = OutputMessage(id=self.item.id, status=status, content=[part])
            events += [self.event("response.output_text.done", item_id=self.item.id, output_index=0, content_index=0,
                                  text=self.text, logprobs=[]),
                       self.event("response.content_part.done", item_id=self.item.id, output_index=0,
                                  content_index=0, part=self._dump(part))]
        events.append(self.event("response.output_item.done", output_index=0, item=self._dump(self.item)))
        response = self.complete(last, usage)
        final = "response.completed" if response.status == "completed" else "response.incomplete"
        return events + [self.event(final, response=self._dump(response))]

    def complete(self, last: GenerationUpdate, usage: ResponseUsage) -> Response:
        """The response once its output item is final."""
        status = self._status(last)
        self.response = self.response.model_copy(update=dict(
            status=status, output=[self.item], usage=usage, route=last.route,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None))
        return self.response

    def failed(self, error: Dict[str, Any]) -> Dict[str, Any]:
        """The event of a stream that failed after it started: ``error`` in OpenAI's shape."""
        details = error.get("error", error)
        return self.event("error", code=details.get("code"), message=details.get("message"),
                          param=details.get("param"))

    @staticmethod
    def _status(last: GenerationUpdate) -> Literal["completed", "incomplete"]:
        cut = last.finish_reason == "length" and not last.stopped_by_sequence
        return "incomplete" if cut else "completed"

    def assistant_message(self) -> Dict[str, Any]:
        """The reply as the conversation's next message, in chat completions' terms (how a later
        request that continues this response sees it)."""
        if isinstance(self.item, FunctionCallItem):
            return {"role": "assistant", "content": None, "tool_calls": [{
                "id": self.item.call_id, "type": "function",
                "function": {"name": self.item.name, "arguments": self.item.arguments}}]}
        return {"role": "assistant", "content": self.text}

