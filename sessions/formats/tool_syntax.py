"""How a model writes a tool call: each syntax declared once, and everything that depends on it.

A call is the whole reply: ``opening + {"name": ..., <arguments key>: {...}} + closing``. One
syntax gives the grammar that holds a reply to a call of the offered tools (or free text that
cannot begin like one), reads a reply back as a call, writes an earlier call the way the model
would have, and tells from a reply's first character whether it is a call. The JSON of a call is
written as the chat templates' ``tojson`` writes it (``", "`` and ``": "`` between items), so a
call the model generated and the same call written back are the same text.
"""

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from sessions.engine.schema_limits import check_schema

# (name, JSON schema of its parameters) of each function a reply may call.
Functions = Sequence[Tuple[str, Dict[str, Any]]]


@dataclass(frozen=True)
class ParsedCall:
    """A call read from a reply: the function's name and its arguments."""

    name: str
    arguments: Dict[str, Any]


def closed(parameters: Dict[str, Any], index: int) -> Dict[str, Any]:
    """The parameters schema of the ``index``-th function as the grammar holds arguments to it: a
    resource of its own (a ``$id``, unless it has one), so that its references (``#/$defs/...``)
    point into it and not into the schema of all calls around it; and allowing only the arguments
    it names, unless it says otherwise (a model left free to add arguments invents them)."""
    schema = {"$id": f"urn:tool:{index}", **parameters}
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        schema["additionalProperties"] = False
    return schema


@dataclass(frozen=True)
class ToolSyntax:
    """One way of writing a call: ``opening``, the call as a JSON object whose arguments are under
    ``arguments_key``, then ``closing``."""

    name: str
    opening: str
    closing: str
    arguments_key: str

    @property
    def first_character(self) -> str:
        """The character every call begins with (free text never does)."""
        return (self.opening or "{")[0]

    def write(self, name: str, arguments: Any) -> str:
        """A call of ``name`` with ``arguments`` as the model writes it."""
        call = json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)
        return self.opening + call + self.closing

    def starts_call(self, text: str) -> bool:
        """Whether a reply that begins with ``text`` (not empty) is a call."""
        return text[:1] == self.first_character

    def parse(self, text: str) -> Optional[ParsedCall]:
        """The call the reply ``text`` is; None for free text (or a call cut short)."""
        if not text.startswith(self.opening) or not text.endswith(self.closing):
            return None
        try:
            call = json.loads(text[len(self.opening):len(text) - len(self.closing)])
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            return None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get(self.arguments_key), dict)):
            return None
        return ParsedCall(call["name"], call[self.arguments_key])

    def grammar(self, functions: Functions, required: bool) -> str:
        """A grammar (llguidance's Lark dialect) for a reply that is one call of ``functions``
        (each call naming one, its arguments satisfying that one's schema), or, unless
        ``required``, free text that does not begin with ``first_character``. ``InvalidRequest``
        naming ``tools`` when the schemas together are over the server's limits on a JSON schema."""
        call_schema = {"anyOf": [
            {"type": "object", "additionalProperties": False, "required": ["name", self.arguments_key],
             "properties": {"name": {"const": name}, self.arguments_key: closed(parameters, index)}}
            for index, (name, parameters) in enumerate(functions)],
            "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
        check_schema(call_schema, param="tools")  # here, where the schemas are still data
        # Literals as JSON strings (the dialect's string escapes are JSON's); an empty one is left out.
        parts = [json.dumps(self.opening), "call_json", json.dumps(self.closing)]
        call = " ".join(part for part in parts if part != '""')
        rules = [f"call: {call}", f"call_json: %json {json.dumps(call_schema)}"]
        if required:
            return "\n".join(["start: call", *rules])
        text = f"TEXT: /[^{_regex_escaped(self.first_character)}][\\s\\S]*/"
        return "\n".join(["start: call | TEXT", *rules, text])


def _regex_escaped(character: str) -> str:
    return "\\" + character if character in "\\]^-[{}/" else character


# Qwen2.5's, Qwen3's and Hermes' format: the call inside <tool_call> tags, on a line of its own.
HERMES = ToolSyntax("hermes", "<tool_call>\n", "\n</tool_call>", "arguments")
# Llama 3.1's and later's format for functions of the user's: the bare JSON object.
LLAMA_JSON = ToolSyntax("llama3-json", "", "", "parameters")
# This server's own format, for models whose chat template knows no tools.
SERVER = ToolSyntax("server", "<tool_call>", "</tool_call>", "arguments")
# The syntaxes a chat template may write calls in, in the order they are tried.
TEMPLATE_SYNTAXES = (HERMES, LLAMA_JSON)
