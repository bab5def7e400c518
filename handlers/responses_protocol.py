"""The request body of OpenAI's Responses API (``POST /v1/responses``), as a typed model.

A response request is a chat completion in other words: its ``instructions`` and ``input`` items
(messages, earlier function calls and their outputs) become a conversation, its function tools,
``tool_choice`` and ``text.format`` the chat request's tools and response format. So it is
checked here, field by field in its own names, and then turned into a ``ChatCompletionRequest``
that renders, constrains and runs as any chat completion does. Nothing here touches a model.
"""

from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from handlers.openai_protocol import (
    ChatCompletionRequest,
    ChatMessage,
    JSONSchemaFormat,
    ResponseFormat,
    refuse_unsupported,
    validated,
)
from handlers.openai_tools import CalledFunction, FunctionDefinition, NamedFunction, NamedToolChoice, Tool, ToolCall
from sessions import request_rules as rules
from sessions.errors import BadRequest

# Fields of the Responses API this server does not implement: set to anything but their "off"
# value, they are refused with a 400 that names them.
NOT_SUPPORTED = {
    "background": (None, False), "conversation": (None,), "prompt": (None,), "truncation": (None, "disabled"),
    "top_logprobs": (None, 0),
}
MAX_INPUT_ITEMS = 2048
MAX_METADATA_PAIRS = 16
# Content parts that carry text; any other (images, files, audio) is refused by name.
TEXT_PARTS = ("input_text", "output_text", "text")


class TextPart(BaseModel):
    """A text part of a message's content: ``input_text`` (the user's) or ``output_text`` (a reply's)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, part_type: str) -> str:
        if part_type not in TEXT_PARTS:
            raise ValueError(f"only text content parts are supported, not {part_type!r}")
        return part_type


class InputItem(BaseModel):
    """One item of ``input``: a message (``type`` "message", or none), an earlier ``function_call``,
    its ``function_call_output``, or a ``reasoning`` item (accepted and left out: nothing here
    writes reasoning)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Optional[Literal["user", "assistant", "system", "developer"]] = None
    content: Union[str, List[TextPart], None] = None
    call_id: Optional[str] = Field(default=None, max_length=256)
    name: Optional[str] = None
    arguments: Optional[str] = None
    output: Union[str, List[TextPart], None] = None

    def check(self) -> "InputItem":
        """The item, or ``ValueError`` saying what a ``type`` of its kind lacks."""
        needs = {"message": ("role",), "function_call": ("call_id", "name", "arguments"),
                 "function_call_output": ("call_id", "output")}.get(self.type, ())
        missing = [field for field in needs if getattr(self, field) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(missing)}")
        return self

    @staticmethod
    def text_of(content: Union[str, List[TextPart], None]) -> str:
        """A content's text (parts joined)."""
        return content if isinstance(content, str) or content is None else "".join(part.text for part in content)


class FunctionTool(BaseModel):
    """A function tool in the Responses API's flat shape."""

    model_config = ConfigDict(extra="ignore")

    type: str
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None

    @field_validator("type")
    @classmethod
    def _functions_only(cls, tool_type: str) -> str:
        if tool_type != "function":
            raise ValueError(f"only function tools are supported, not {tool_type!r}")
        return tool_type

    def chat_tool(self) -> Tool:
        """The tool as a chat completion takes it."""
        definition = FunctionDefinition(name=self.name, description=self.description)
        if self.parameters is not None:
            definition.parameters = self.parameters
        return Tool(type="function", function=definition)


class FunctionChoice(BaseModel):
    """``tool_choice`` naming the function the reply must call."""

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """``text.format``: free text, any JSON object, or JSON valid against a named schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None

    def response_format(self) -> Optional[ResponseFormat]:
        """The format as a chat completion's ``response_format`` (None for free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(type="json_object")
        if self.schema_ is None:
            raise ValueError("a json_schema format needs its schema")
        return ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(
            name=self.name, description=self.description, schema=self.schema_, strict=self.strict))


class TextOptions(BaseModel):
    """``text``: the reply's format (``verbosity`` is accepted and has no effect here)."""

    model_config = ConfigDict(extra="ignore")

    format: Optional[TextFormat] = None


class ResponseRequest(BaseModel):
    """``POST /v1/responses``"""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: Union[str, List[InputItem]] = ""
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = Field(default=None, max_length=128)
    tools: Optional[List[FunctionTool]] = Field(default=None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], FunctionChoice, None] = None
    parallel_tool_calls: Optional[bool] = None  # accepted; a reply makes at most one call
    text: Optional[TextOptions] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, **rules.TEMPERATURE.field_limits())
    top_p: Optional[float] = Field(default=None, **rules.TOP_P.field_limits())
    store: bool = True
    stream: bool = False
    metadata: Optional[Dict[str, str]] = None
    user: Optional[str] = None
    # Accepted and without effect: no model here reasons apart from its reply, and nothing is included.
    reasoning: Optional[Dict[str, Any]] = None
    include: Optional[List[str]] = None

    @classmethod
    def parse(cls, body: Dict[str, Any]) -> "ResponseRequest":
        """The typed request, or ``BadRequest`` naming the field at fault."""
        refuse_unsupported(body, NOT_SUPPORTED)
        request = validated(cls, body)
        try:
            request._check()
        except ValueError as error:
            field = str(error).partition(": ")[0]
            raise BadRequest(str(error), param=field.split(".")[0]) from None
        return request

    def _check(self) -> None:
        if isinstance(self.input, list):
            if len(self.input) > MAX_INPUT_ITEMS:
                raise ValueError(f"input: at most {MAX_INPUT_ITEMS} items")
            for index, item in enumerate(self.input):
                try:
                    item.check()
                except ValueError as error:
                    raise ValueError(f"input.{index}: {error}") from None
        if not self.input and self.previous_response_id is None:
            raise ValueError("input: give the conversation's input (a string or items)")
        if self.metadata is not None and len(self.metadata) > MAX_METADATA_PAIRS:
            raise ValueError(f"metadata: at most {MAX_METADATA_PAIRS} pairs")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools")
        if isinstance(self.tool_choice, FunctionChoice) and self.tool_choice.name not in {
                tool.name for tool in self.tools}:
            raise ValueError(f"tool_choice: names {self.tool_choice.name!r}, which is not in tools")
        if self.text is not None and self.text.format is not None:
            try:
                self.text.format.response_format()
            except ValueError as error:
                raise ValueError(f"text.format: {error}") from None

    def new_messages(self) -> List[ChatMessage]:
        """The conversation's messages this request adds (its ``input``), in chat completions' terms:
        function calls go to an assistant message's ``tool_calls``, their outputs are ``tool`` messages."""
        if isinstance(self.input, str):
            return [ChatMessage(role="user", content=self.input)]
        messages: List[ChatMessage] = []
        for item in self.input:
            if item.type == "message":
                messages.append(ChatMessage(role=item.role, content=InputItem.text_of(item.content)))
            elif item.type == "function_call":
                call = ToolCall(id=item.call_id, function=CalledFunction(name=item.name, arguments=item.arguments))
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant":  # calls that follow a message are its own
                    last.tool_calls = (last.tool_calls or []) + [call]
                else:
                    messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
            elif item.type == "function_call_output":
                messages.append(ChatMessage(role="tool", tool_call_id=item.call_id,
                                            content=InputItem.text_of(item.output)))
        return messages

    def conversation(self, earlier: Sequence[Dict[str, Any]]) -> List[ChatMessage]:
        """The conversation this request continues and adds to: ``earlier`` messages (a previous
        response's, its instructions left out), then this request's input."""
        messages = [ChatMessage.model_validate(message) for message in earlier] + self.new_messages()
        if not messages:
            raise BadRequest("input: the conversation is empty", param="input")
        return messages

    def chat_request(self, conversation: List[ChatMessage]) -> "ChatFromResponse":
        """The chat completion this request is: its ``instructions`` as a system message, then the
        ``conversation`` (from ``conversation``)."""
        messages = ([ChatMessage(role="system", content=self.instructions)] if self.instructions else []) + conversation
        tool_choice = self.tool_choice
        if isinstance(tool_choice, FunctionChoice):
            tool_choice = NamedToolChoice(type="function", function=NamedFunction(name=tool_choice.name))
        text_format = self.text.format if self.text is not None else None
        # Built from fields already checked here (model_construct runs no validator again).
        return ChatFromResponse.model_construct(
            model=self.model, messages=messages, max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p, stream=self.stream,
            tools=[tool.chat_tool() for tool in self.tools] if self.tools else None, tool_choice=tool_choice,
            response_format=text_format.response_format() if text_format is not None else None, user=self.user)


class ChatFromResponse(ChatCompletionRequest):
    """A chat completion made from a response request: its errors name the Responses API's fields."""

    @property
    def max_tokens_field(self) -> str:
        return "max_output_tokens"
