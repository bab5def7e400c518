"""How a conversation is written as one model's input: the one chat format the server owns.

The OpenAI-compatible chat API renders requests with it (unless the model's template describes
tools, see ``sessions.formats.chat_template``), and ``GET /api/v1/models`` describes it to the chat page,
which builds its prompts from that description alone. A model whose tokenizer has a chat template
gets the template's role markers, found by rendering sample conversations; one without a template
(or with a template this model of per-role prefixes and suffixes cannot reproduce) gets plain
``Role: text`` turns separated by ``chat.sep_token``.
"""

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from model_specs import ChatSettings
from sessions.errors import InvalidRequest
from sessions.formats.chat_template import ChatTemplate, ChatTemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

Messages = Sequence[Mapping[str, str]]
# A chat template as a function: (messages, add_generation_prompt) -> text.
Template = Callable[[Messages, bool], str]

# Message contents that no template writes by itself, so that they can be found in its output
# and everything around them is markup.
_SENTINEL_SYSTEM = "SENTINEL0system"
_SENTINEL_USER = "SENTINEL1user"
_SENTINEL_ASSISTANT = "SENTINEL2assistant"
_SENTINEL_USER_AGAIN = "SENTINEL3user"

# Conversations the derived format must render exactly as the template does: with and without
# a system message, ending with either role, with several lines and non-ASCII text.
_SAMPLE_CONVERSATIONS: Tuple[Tuple[Dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Hello!"},),
    ({"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What is the capital of France?"}),
    ({"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Name a colour.\nJust one."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, auf Deutsch bitte (grün?)"}),
    ({"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "Why did the chicken cross the road?"}),
)


class TemplateMismatch(ValueError):
    """A chat template that per-role prefixes and suffixes cannot reproduce."""


@dataclass(frozen=True)
class RoleMarkers:
    """What surrounds one message of a role: ``prefix + content + suffix``."""

    prefix: str
    suffix: str


@dataclass(frozen=True)
class ChatFormat:
    """A model's chat format: every message is its role's ``prefix + content + suffix``; a reply
    to be generated starts with ``generation_prefix``.

    ``default_system`` is the system text the model's template writes when a conversation has
    no system message (None when it writes none). ``stop_sequences`` are the texts that end the
    assistant's turn, ``stop_token`` first.
    """

    roles: Mapping[str, RoleMarkers] = field(hash=False)  # a mapping cannot be hashed
    generation_prefix: str
    default_system: Optional[str]
    stop_token: str
    stop_sequences: Tuple[str, ...]

    @classmethod
    def for_model(cls, tokenizer: "PreTrainedTokenizerBase", chat: ChatSettings, stop_token: str) -> "ChatFormat":
        """The format of a model: its tokenizer's chat template when it has one that this class
        reproduces exactly, else the declared ``Role: text`` format of ``chat``."""
        model = getattr(tokenizer, "name_or_path", "a model")
        try:
            template = ChatTemplate.for_tokenizer(tokenizer)
        except ChatTemplateError as error:
            logger.warning("The chat template of %s is not used (%s)", model, error)
            template = None
        return cls.for_template(template, chat, stop_token, model)

    @classmethod
    def for_template(cls, template: Optional[ChatTemplate], chat: ChatSettings, stop_token: str,
                     model: str = "a model") -> "ChatFormat":
        """The format ``template`` writes when this class reproduces it exactly, else (or with no
        template) the declared ``Role: text`` format of ``chat``."""
        stop_sequences = tuple(dict.fromkeys(filter(None, (stop_token, *chat.extra_stop_sequences))))
        if template is not None:

            def render(messages: Messages, add_generation_prompt: bool) -> str:
                return template.render(messages, add_generation_prompt=add_generation_prompt)

            try:
                return cls.from_template(render, stop_token, stop_sequences)
            # A template may refuse a sample (e.g. no system role), or write what markers cannot.
            except (ChatTemplateError, TemplateMismatch) as error:
                logger.warning("The chat template of %s does not fit role prefixes and suffixes (%s); using the "
                               "declared format", model, error)
        return cls.declared(chat, stop_token, stop_sequences)

    @classmethod
    def declared(cls, chat: ChatSettings, stop_token: str, stop_sequences: Tuple[str, ...]) -> "ChatFormat":
        """``System: ``/``User: ``/``Assistant: `` turns, each followed by ``chat.sep_token``; a
        reply starts with ``Assistant:`` (the model writes the space)."""
        roles = {role: RoleMarkers(f"{role.capitalize()}: ", chat.sep_token) for role in ROLES}
        return cls(roles=MappingProxyType(roles), generation_prefix="Assistant:", default_system=None,
                   stop_token=stop_token, stop_sequences=stop_sequences)

    @classmethod
    def from_template(cls, template: Template, stop_token: str, stop_sequences: Tuple[str, ...]) -> "ChatFormat":
        """The format a chat template writes, found by rendering sentinel contents and cutting
        around them; raises ``TemplateMismatch`` unless it renders the sample conversations
        exactly as the template does."""
        system = {"role": "system", "content": _SENTINEL_SYSTEM}
        user = {"role": "user", "content": _SENTINEL_USER}
        assistant = {"role": "assistant", "content": _SENTINEL_ASSISTANT}
        user_again = {"role": "user", "content": _SENTINEL_USER_AGAIN}
        conversation = [system, user, assistant, user_again]
        text = template(conversation, False)
        before_system, system_to_user, user_to_assistant, assistant_to_user, user_suffix = _cut(
            text, [message["content"] for message in conversation])
        # Between two messages stand the first's suffix and the second's prefix; a conversation
        # ending with a role's message shows that role's suffix alone.
        *_, assistant_suffix = _cut(template([system, user, assistant], False),
                                    [_SENTINEL_SYSTEM, _SENTINEL_USER, _SENTINEL_ASSISTANT])
        assistant_prefix = _without_prefix(user_to_assistant, user_suffix, "the user's suffix")
        user_prefix = _without_prefix(assistant_to_user, assistant_suffix, "the assistant's suffix")
        system_suffix = _without_suffix(system_to_user, user_prefix, "the user's prefix")
        roles = {"system": RoleMarkers(before_system, system_suffix), "user": RoleMarkers(user_prefix, user_suffix),
                 "assistant": RoleMarkers(assistant_prefix, assistant_suffix)}
        generation_prefix = _without_prefix(template(conversation, True), text, "the conversation")
        # A template may write a system message of its own before a conversation without one.
        user_only = template([user], False)
        user_message = user_prefix + _SENTINEL_USER + user_suffix
        default_system = None
        if user_only != user_message:
            default_system = _without_suffix(_without_prefix(user_only, before_system, "the system prefix"),
                                             system_suffix + user_message, "the user's message")
        chat_format = cls(roles=MappingProxyType(roles), generation_prefix=generation_prefix,
                          default_system=default_system, stop_token=stop_token, stop_sequences=stop_sequences)
        # Exact for every conversation that ends with a turn to answer, which is what the page and
        # /v1 send: a template may write the reply after the last question apart (Qwen3 puts its
        # thinking there), which no per-role markers can.
        for sample in (sample for sample in _SAMPLE_CONVERSATIONS if sample[-1]["role"] != "assistant"):
            for add_generation_prompt in (False, True):
                if chat_format.render(sample, add_generation_prompt) != template(sample, add_generation_prompt):
                    raise TemplateMismatch(f"rendering {[m['role'] for m in sample]} differs from the template's")
        return chat_format

    def render(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """``messages`` (``{"role", "content"}``) as model input, then the start of the assistant's
        reply when ``add_generation_prompt``; an unknown role raises ``InvalidRequest``."""
        parts: List[str] = []
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            parts.append(self._message("system", self.default_system))
        parts.extend(self._message(message["role"], message["content"]) for message in messages)
        if add_generation_prompt:
            parts.append(self.generation_prefix)
        return "".join(parts)

    def describe(self) -> Dict[str, Any]:
        """The format as JSON for clients (the chat page builds its prompts from it)."""
        return {
            "roles": {role: {"prefix": markers.prefix, "suffix": markers.suffix}
                      for role, markers in self.roles.items()},
            "generation_prefix": self.generation_prefix,
            "default_system": self.default_system,
            "stop_token": self.stop_token,
            "stop_sequences": list(self.stop_sequences),
        }

    def _message(self, role: str, content: str) -> str:
        markers = self.roles.get(role)
        if markers is None:
            raise InvalidRequest(f"Unknown message role {role!r}; the roles are: {', '.join(self.roles)}",
                                 param="messages")
        return markers.prefix + content + markers.suffix


def _cut(text: str, sentinels: Sequence[str]) -> List[str]:
    """The pieces of ``text`` around ``sentinels``, which must each appear once, in order."""
    pieces = []
    for sentinel in sentinels:
        if text.count(sentinel) != 1:
            raise TemplateMismatch(f"the template writes a message's content {text.count(sentinel)} times")
        before, text = text.split(sentinel)
        pieces.append(before)
    return [*pieces, text]


def _without_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise TemplateMismatch(f"{text!r} does not start with {what} {prefix!r}")
    return text[len(prefix):]


def _without_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise TemplateMismatch(f"{text!r} does not end with {what} {suffix!r}")
    return text[:len(text) - len(suffix)]
