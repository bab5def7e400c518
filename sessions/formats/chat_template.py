"""A model's own chat template, rendered here: compiled once with jinja2's sandbox, as the model
hub's templates expect to be (transformers' environment: ``trim_blocks``, ``lstrip_blocks``, the
``loopcontrols`` extension, a ``tojson`` that keeps non-ASCII text and takes ``indent``,
``raise_exception`` and ``strftime_now``), with the conversation, OpenAI's ``tools`` and the
tokenizer's special tokens.

A template is the model's, not the client's, but the conversation it renders is the client's:
whatever a template raises on it is a ``ChatTemplateError``, which the APIs answer as a bad
request. Rendering is CPU work on a client's text: callers run it off the event loop.
"""

import functools
import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.sandbox

from sessions.formats.tool_syntax import TEMPLATE_SYNTAXES, ToolSyntax

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Qwen3's templates let a reply skip its thinking: with this variable false, the prompt holds an
# empty think block and the reply starts with the answer itself.
THINKING_SWITCH = "enable_thinking"

# A conversation in which the assistant made a call, to learn how a template writes one.
_PROBE_FUNCTION = "probe_function"
_PROBE_ARGUMENTS = {"city": "Paris", "days": 2}
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": _PROBE_FUNCTION, "description": "A function.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
_PROBE_QUESTION = [{"role": "user", "content": "A question."}]
_PROBE_CALL = [*_PROBE_QUESTION, {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_0", "type": "function", "function": {"name": _PROBE_FUNCTION, "arguments": _PROBE_ARGUMENTS}}]}]


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that refused to render a conversation."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None,
            sort_keys: bool = False) -> str:
    # Not jinja2's own filter, which escapes HTML characters: templates write JSON for a model.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


class ChatTemplate:
    """A chat template (jinja2 source) compiled once, rendered with ``special_tokens`` (the
    tokenizer's ``bos_token``, ``eos_token``, ...) beside what each call gives.
    ``ChatTemplateError`` when it does not compile."""

    def __init__(self, source: str, special_tokens: Mapping[str, Any]):
        environment = _environment()
        try:
            self._template = environment.from_string(source)
            self.variables = frozenset(jinja2.meta.find_undeclared_variables(environment.parse(source)))
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template does not compile: {error}") from None
        self.source = source
        self._special_tokens = dict(special_tokens)

    @classmethod
    def for_tokenizer(cls, tokenizer: "PreTrainedTokenizerBase") -> Optional["ChatTemplate"]:
        """The tokenizer's chat template, None when it has none; ``ChatTemplateError`` when it
        does not compile or is not one template (a list of named ones is not supported)."""
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            return None
        if not isinstance(source, str):
            raise ChatTemplateError("the tokenizer has several named chat templates; one template is supported")
        return cls(source, tokenizer.special_tokens_map)

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Optional[List[Dict[str, Any]]] = None,
               add_generation_prompt: bool = True, thinking: bool = True) -> str:
        """``messages`` (OpenAI's shape: ``role``, ``content``, an assistant's ``tool_calls`` with
        their arguments as objects, a tool's ``tool_call_id``) and ``tools`` (OpenAI's list, None:
        no tools) as the model's input, opening the assistant's reply when
        ``add_generation_prompt``. Without ``thinking``, a template that can (Qwen3's) asks the
        reply to skip thinking. ``ChatTemplateError`` when the template refuses them."""
        options = {} if thinking or THINKING_SWITCH not in self.variables else {THINKING_SWITCH: False}
        try:
            # ``documents`` as transformers passes it, for templates that test whether it is defined.
            return self._template.render(**self._special_tokens, messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **options)
        # A template may fail in any way on a conversation it does not expect (raise_exception, a
        # missing key, text added to None): the conversation is what it refuses.
        except Exception as error:
            raise ChatTemplateError(f"the model's chat template refused the conversation: {error}") from None

    @functools.cached_property
    def tool_syntax(self) -> Optional[ToolSyntax]:
        """The syntax this template writes tool calls in, when it describes tools to the model
        and writes an earlier call exactly as one of ``TEMPLATE_SYNTAXES`` does; else None
        (found by rendering a conversation with a call)."""
        try:
            if self.render(_PROBE_QUESTION, _PROBE_TOOLS) == self.render(_PROBE_QUESTION):
                return None  # the tools are not shown to the model
            written = self.render(_PROBE_CALL, _PROBE_TOOLS, add_generation_prompt=False)
        except ChatTemplateError as error:
            logger.info("The chat template cannot render a tool call (%s); tools use this server's format", error)
            return None
        return next((syntax for syntax in TEMPLATE_SYNTAXES
                     if syntax.write(_PROBE_FUNCTION, _PROBE_ARGUMENTS) in written), None)
