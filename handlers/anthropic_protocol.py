"""The request bodies of Anthropic's Messages API (``/v1/messages``), as typed models.

A request is checked here (a bad or unsupported field is a 400 that names it) and then said
again as the chat completion request it amounts to (``chat_request``): the same conversation,
tools and settings in OpenAI's shape, so that prompts, tool grammars and sampling are those of
``/v1/chat/completions``, not a copy of them. A ``tool_use`` block becomes an assistant's tool
call, a ``tool_result`` block a ``tool`` message. Nothing here touches a model or a session.
"""

import json
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from handlers.openai_protocol import ChatCompletionRequest, refuse_unsupported, validated
from sessions import request_rules as rules
from sessions.errors import BadRequest

# Fields of Anthropic's API this server does not implement: set to anything but their "off"
# value, they are refused with a 400 that names them rather than silently ignored.
NOT_SUPPORTED = {
    "thinking": (None, {"type": "disabled"}), "container": (None,),
    "mcp_servers": (None, []), "context_management": (None,), "speed": (None, "standard"),
}
# The content blocks a message may hold; any other (image, document, thinking, ...) is refused by name.
BLOCK_TYPES = {"text", "tool_use", "tool_result"}
ERROR_PREFIX = "Error: "  # how a tool_result with is_error reaches the model: its text after this


def as_blocks(content: Any) -> Any:
    """Content as a list of blocks (a string is one text block), once its blocks are known to be
    of ``BLOCK_TYPES`` (a tool result's of text only): any other is refused by its type and place."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        for index, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in BLOCK_TYPES:
                raise ValueError(f"block {index}: {kind!r} blocks are not supported by this server "
                                 f"(only {', '.join(sorted(BLOCK_TYPES))})")
            inner = block.get("content")
            if kind == "tool_result" and isinstance(inner, list):
                for part in inner:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        kind = part.get("type") if isinstance(part, dict) else None
                        raise ValueError(f"block {index}: a tool result's {kind!r} blocks are not supported "
                                         "by this server (only text)")
    return content


class Block(BaseModel):
    """What every content block has: its type, and a prompt caching hint (accepted: a warm
    session caches a conversation's beginning by itself)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    cache_control: Optional[Dict[str, Any]] = None


class TextBlock(Block):
    """``{"type": "text", "text": ...}``; citations are not supported."""

    type: Literal["text"]
    text: str
    citations: Optional[List[Any]] = None

    @model_validator(mode="after")
    def _no_citations(self) -> "TextBlock":
        if self.citations:
            raise ValueError("citations are not supported by this server")
        return self


class ToolUseBlock(Block):
    """A call an earlier assistant turn made (sent back by the client)."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: Dict[str, Any]


class ToolResultBlock(Block):
    """The result of a call, in a user turn: text (a string or text blocks), maybe an error."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: List[TextBlock] = []
    is_error: bool = False

    _as_blocks = field_validator("content", mode="before")(as_blocks)

    @property
    def text(self) -> str:
        """The result as the model reads it."""
        text = "".join(block.text for block in self.content)
        return ERROR_PREFIX + text if self.is_error else text


ContentBlock = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock], Field(discriminator="type")]


class OutputFormat(BaseModel):
    """``output_config.format``: JSON valid against a schema."""

    type: Literal["json_schema"]
    schema_: Dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    """``output_config``: the reply's ``format``, and an ``effort`` (accepted, no effect: no model
    here thinks apart from its reply). Anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")

    effort: Optional[str] = None
    format: Optional[OutputFormat] = None


class Message(BaseModel):
    """One turn: the user's (text, tool results), the assistant's (text, tool calls), or a system
    message's text in the conversation's course (agent tools send them; it is rendered in place)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant", "system"]
    content: List[ContentBlock]

    _as_blocks = field_validator("content", mode="before")(as_blocks)

    @model_validator(mode="after")
    def _blocks_of_its_role(self) -> "Message":
        misplaced = {"user": ("tool_use",), "assistant": ("tool_result",),
                     "system": ("tool_use", "tool_result")}[self.role]
        for block in self.content:
            if block.type in misplaced:
                raise ValueError(f"{block.type} blocks are not allowed in a {self.role} message")
        return self

    def chat_messages(self) -> List[Dict[str, Any]]:
        """The turn as chat completion messages: consecutive text blocks form one message, each
        tool result is a ``tool`` message, and the assistant's calls go with its text."""
        if self.role == "system":
            return [{"role": "system", "content": "".join(block.text for block in self.content)}]
        if self.role == "assistant":
            calls = [{"id": block.id, "type": "function",
                      "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}}
                     for block in self.content if isinstance(block, ToolUseBlock)]
            text = "".join(block.text for block in self.content if isinstance(block, TextBlock))
            return [{"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}]
        messages: List[Dict[str, Any]] = []
        for block in self.content:
            if isinstance(block, ToolResultBlock):
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text})
            elif messages and messages[-1]["role"] == "user":
                messages[-1]["content"] += block.text
            else:
                messages.append({"role": "user", "content": block.text})
        return messages


class Tool(BaseModel):
    """A function the model may call: its name, what it does, and its input's JSON schema.
    Anthropic's server tools (a ``type`` such as ``web_search_20250305``) are not supported."""

    model_config = ConfigDict(extra="ignore")

    type: Optional[Literal["custom"]] = None
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Optional[str] = None
    input_schema: Dict[str, Any]
    cache_control: Optional[Dict[str, Any]] = None

    @model_validator(mode="before")
    @classmethod
    def _custom_only(cls, tool: Any) -> Any:
        if isinstance(tool, dict) and tool.get("type") not in (None, "custom"):
            raise ValueError(f"server tools (type {tool.get('type')!r}) are not supported by this server")
        return tool

    def chat_tool(self) -> Dict[str, Any]:
        """The tool as a chat completion's ``tools`` entry."""
        function = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ToolChoice(BaseModel):
    """``auto`` (text or a call), ``any`` (a call of any tool), ``tool`` (a call of the one
    ``name``d) or ``none``; a reply makes at most one call, whatever ``disable_parallel_tool_use``."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None

    @model_validator(mode="after")
    def _named(self) -> "ToolChoice":
        if (self.type == "tool") != (self.name is not None):
            raise ValueError('a name goes with type "tool", and only with it')
        return self

    def chat_choice(self) -> Union[str, Dict[str, Any]]:
        """The choice as a chat completion's ``tool_choice``."""
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class Metadata(BaseModel):
    """``metadata``: accepted (its ``user_id`` is not used)."""

    model_config = ConfigDict(extra="ignore")

    user_id: Optional[str] = None


class CountTokensRequest(BaseModel):
    """``POST /v1/messages/count_tokens``: the conversation and tools of a request."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: List[Message] = Field(min_length=1)
    system: Optional[List[TextBlock]] = None
    tools: Optional[List[Tool]] = Field(default=None, max_length=128)
    tool_choice: Optional[ToolChoice] = None
    output_config: Optional[OutputConfig] = None

    _as_blocks = field_validator("system", mode="before")(as_blocks)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, body: Any) -> Any:
        return refuse_unsupported(body, NOT_SUPPORTED)

    @model_validator(mode="after")
    def _continues_text_only(self) -> "CountTokensRequest":
        if self.messages[-1].role != "assistant":
            return self
        if len(self.messages) == 1 or any(block.type != "text" for block in self.messages[-1].content):
            raise BadRequest("messages: a last assistant message, the beginning of the reply, follows a user "
                             "message and holds text only", param="messages")
        if self.tools and (self.tool_choice is None or self.tool_choice.type != "none"):
            raise BadRequest('messages: a reply that continues a last assistant message calls no tools (give '
                             'tool_choice {"type": "none"})', param="messages")
        return self

    @classmethod
    def parse(cls, body: Dict[str, Any]) -> "CountTokensRequest":
        """The typed request, or ``BadRequest`` naming the field at fault."""
        return validated(cls, body)

    @property
    def prefill(self) -> str:
        """The beginning of the reply: a last assistant message's text, which the reply continues."""
        last = self.messages[-1]
        return "".join(block.text for block in last.content) if last.role == "assistant" else ""

    def chat_fields(self) -> Dict[str, Any]:
        """The chat completion request's fields: the conversation (the system prompt first, the
        beginning of the reply left out), and the tools."""
        system = [{"role": "system", "content": "".join(block.text for block in self.system)}] if self.system else []
        turns = self.messages[:-1] if self.messages[-1].role == "assistant" else self.messages
        fields: Dict[str, Any] = {
            "model": self.model, "messages": system + [chat for message in turns for chat in message.chat_messages()]}
        if self.tools:
            fields["tools"] = [tool.chat_tool() for tool in self.tools]
        if self.tool_choice is not None:
            fields["tool_choice"] = self.tool_choice.chat_choice()
        if self.output_config is not None and self.output_config.format is not None:
            fields["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "output", "schema": self.output_config.format.schema_}}
        return fields

    def chat_request(self) -> ChatCompletionRequest:
        """The chat completion request this one amounts to (``BadRequest`` for what it refuses,
        e.g. a ``tool_choice`` that names no tool)."""
        return ChatCompletionRequest.parse(self.chat_fields())


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``: a conversation and how to answer it; ``max_tokens`` is required."""

    max_tokens: int = Field(ge=1)
    temperature: Optional[float] = Field(default=None, **rules.TEMPERATURE.field_limits())
    top_p: Optional[float] = Field(default=None, **rules.TOP_P.field_limits())
    top_k: Optional[int] = Field(default=None, **rules.TOP_K.field_limits())
    stop_sequences: Optional[List[str]] = Field(default=None, max_length=rules.MAX_STOP_SEQUENCES)
    stream: bool = False
    metadata: Optional[Metadata] = None
    service_tier: Optional[Literal["auto", "standard_only"]] = None  # accepted: there is one tier
    trace_route: bool = False  # our extension, as on /v1/chat/completions

    def chat_fields(self) -> Dict[str, Any]:
        return dict(super().chat_fields(), max_tokens=self.max_tokens, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, stop=self.stop_sequences, stream=self.stream,
                    trace_route=self.trace_route)
