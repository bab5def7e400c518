"""Tool calling for ``/v1/chat/completions``, in a prompt format of this server's own.

The tools are described to the model in a system message; a call is the whole reply, written
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. Decoding is constrained by a
grammar, so that a call always names one of the tools and its arguments always satisfy that
tool's parameter schema: with ``tool_choice`` "auto" the reply is either free text (which does
not begin with "<") or one call; with "required" or a named function it is a call. Earlier calls
and their results go back into the conversation in the same format.
"""

import json
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from sessions.schema_limits import check_schema

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_INSTRUCTIONS = (
    "You can call the tools below. To call one, reply with only this, and nothing else:\n"
    + CALL_OPEN + '{"name": "<tool name>", "arguments": {<its arguments>}}' + CALL_CLOSE
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


class ToolCall(BaseModel):
    """A call an earlier assistant message made (sent back by the client)."""

    model_config = ConfigDict(extra="ignore")

    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: CalledFunction


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
    """The system text that describes the tools to the model."""
    lines = [f"- {tool.function.name}: {tool.function.description or 'no description'}. Parameters (JSON "
             f"schema): {json.dumps(tool.function.parameters)}" for tool in tools]
    return TOOL_INSTRUCTIONS + "\n".join(lines)


def closed(parameters: Dict[str, Any]) -> Dict[str, Any]:
    """A parameters schema that allows only the arguments it names, unless it says otherwise: a
    model left free to add arguments invents them."""
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def tool_grammar(tools: List[Tool], required: bool) -> str:
    """A grammar (llguidance's Lark dialect) for a reply that is one call of ``tools``, or, unless
    ``required``, free text that does not begin with "<". ``InvalidRequest`` naming ``tools`` when
    their schemas together are over the server's limits on a JSON schema."""
    call_schema = {"anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
         "properties": {"name": {"const": tool.function.name}, "arguments": closed(tool.function.parameters)}}
        for tool in tools], "x-guidance": {"whitespace_flexible": False}}
    check_schema(call_schema, param="tools")  # here, where the schemas are still data
    rules = [f"call: {json.dumps(CALL_OPEN)} call_json {json.dumps(CALL_CLOSE)}",
             f"call_json: %json {json.dumps(call_schema)}"]
    if required:
        return "\n".join(["start: call", *rules])
    return "\n".join(["start: call | TEXT", *rules, r"TEXT: /[^<][\s\S]*/"])


def written_call(call: ToolCall) -> str:
    """An earlier call as the model wrote it."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    return CALL_OPEN + json.dumps({"name": call.function.name, "arguments": arguments}) + CALL_CLOSE


def parse_call(text: str) -> Optional[Dict[str, Any]]:
    """The reply as OpenAI's ``tool_calls`` entry, if it is a call; None for free text."""
    if not (text.startswith(CALL_OPEN) and text.endswith(CALL_CLOSE)):
        return None
    call = json.loads(text[len(CALL_OPEN):-len(CALL_CLOSE)])
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}
