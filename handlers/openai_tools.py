"""Tool calling for ``/v1/chat/completions``: the request's tools and calls, and OpenAI's shapes.

How a call is written (the grammar that holds a reply to one, reading it back, writing an earlier
one) is the model's tool syntax (``sessions.formats.tool_syntax``): its chat template's when the template
describes tools, else this server's own (``SERVER``), for which the tools are described to the
model in a system message of this module's. Decoding is constrained by the syntax's grammar, so
that a call always names one of the tools and its arguments always satisfy that tool's parameter
schema: with ``tool_choice`` "auto" the reply is either free text (which does not begin like a
call) or one call; with "required" or a named function it is a call.
"""

import json
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from sessions.formats.tool_syntax import SERVER, Functions, ParsedCall

TOOL_INSTRUCTIONS = (
    "You can call the tools below. To call one, reply with only this, and nothing else:\n"
    + SERVER.opening + '{"name": "<tool name>", "arguments": {<its arguments>}}' + SERVER.closing
    + "\nOtherwise, answer normally.\n\nTools:\n")


class FunctionDefinition(BaseModel):
    """A tool's function: its name, what it does, and its parameters' JSON schema."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Optional[str] = None
    parameters: Dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(BaseModel):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming the function the reply must call."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class CalledFunction(BaseModel):
    name: str
    arguments: str = "{}"

    @property
    def value(self) -> Any:
        """The arguments as an object, or the text as sent when it is not JSON."""
        try:
            return json.loads(self.arguments)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            return self.arguments


class ToolCall(BaseModel):
    """A call an earlier assistant message made (sent back by the client)."""

    model_config = ConfigDict(extra="ignore")

    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: CalledFunction

    def template_call(self) -> Dict[str, Any]:
        """The call as a chat template takes it: its arguments as an object."""
        call: Dict[str, Any] = {"type": "function",
                                "function": {"name": self.function.name, "arguments": self.function.value}}
        if self.id is not None:
            call["id"] = self.id
        return call


def tools_called_for(tools: List[Tool], choice: ToolChoice) -> List[Tool]:
    """The tools the reply may call (all of them, one, or none); a name not among them raises."""
    if choice == "none":
        return []
    if isinstance(choice, NamedToolChoice):
        named = [tool for tool in tools if tool.function.name == choice.function.name]
        if not named:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        return named
    return tools


def tool_instructions(tools: List[Tool]) -> str:
    """The system text that describes the tools to a model that calls them in this server's format."""
    lines = [f"- {tool.function.name}: {tool.function.description or 'no description'}. Parameters (JSON "
             f"schema): {json.dumps(tool.function.parameters)}" for tool in tools]
    return TOOL_INSTRUCTIONS + "\n".join(lines)


def functions_of(tools: List[Tool]) -> Functions:
    """The name and parameter schema of each tool, as a tool syntax's grammar takes them."""
    return [(tool.function.name, tool.function.parameters) for tool in tools]


def written_call(call: ToolCall) -> str:
    """An earlier call as a model that calls tools in this server's format wrote it."""
    return SERVER.write(call.function.name, call.function.value)


def new_call_id() -> str:
    """A new id for a call a reply makes."""
    return "call_" + uuid.uuid4().hex[:24]


def openai_tool_call(call: ParsedCall) -> Dict[str, Any]:
    """A call read from a reply as OpenAI's ``tool_calls`` entry (with a new id)."""
    return {"id": new_call_id(), "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
