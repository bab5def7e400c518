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

    def streamer(self) -> "CallStreamer":
        """Reads a call of this syntax as the model writes it."""
        return CallStreamer(self)

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


@dataclass(frozen=True)
class CallDelta:
    """What one piece of a call's text tells: the function's ``name`` (on the piece where it
    becomes known, else None) and the text of the arguments written since the piece before."""

    name: Optional[str] = None
    arguments: str = ""


class CallStreamer:
    """Reads a call as it is written, so that its name and then its arguments reach the client
    while the model writes them, not once the call is whole.

    A call the grammar holds is written as ``opening + {"name": "NAME", "KEY": ARGUMENTS} +
    closing``. Once the text up to ARGUMENTS has come, the name is told; from then on each piece's
    argument text is told, but for an end that could begin the call's own ``}`` and ``closing``,
    held until the next piece shows what it is. The argument deltas join to exactly the arguments'
    JSON text as the model wrote it.
    """

    def __init__(self, syntax: ToolSyntax):
        self.syntax = syntax
        self.text = ""  # the call as written so far
        self.name: Optional[str] = None
        self._head = syntax.opening + '{"name": "'
        self._end = "}" + syntax.closing  # what ends the call
        self._told = -1  # where the argument text not yet told begins (-1: the name is not known yet)

    def push(self, text: str) -> CallDelta:
        """The news in ``text``, the next piece of the call."""
        self.text += text
        name = None
        if self.name is None:
            marker = self.text.find(f'", "{self.syntax.arguments_key}": ', len(self._head))
            if marker < 0 or not self.text.startswith(self._head):
                return CallDelta()
            try:
                self.name = name = json.loads(self.text[len(self._head) - 1:marker + 1])
            except ValueError:
                return CallDelta()
            self._told = marker + len(f'", "{self.syntax.arguments_key}": ')
        return CallDelta(name, self._tell(len(self.text) - self._maybe_end()))

    def finish(self) -> Tuple[Optional[ParsedCall], CallDelta]:
        """Once the reply ended: the call (None when the text is not a whole call, e.g. cut short by
        a token limit) and what was not told yet (the name, if it never was, and the rest of the
        arguments: up to the call's end, or all the text written when it was cut short)."""
        call = self.syntax.parse(self.text)
        if self.name is None:
            if call is None:
                return None, CallDelta()
            arguments = json.dumps(call.arguments, ensure_ascii=False)
            self.name = call.name
            return call, CallDelta(call.name, arguments)
        return call, CallDelta(None, self._tell(len(self.text) - len(self._end) if call is not None else len(self.text)))

    def _maybe_end(self) -> int:
        """How many characters at the end of the text could be the start of the call's end."""
        return next((length for length in range(len(self._end), 0, -1) if self.text.endswith(self._end[:length])), 0)

    def _tell(self, end: int) -> str:
        told = self.text[self._told:end] if end > self._told else ""
        self._told += len(told)
        return told


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
