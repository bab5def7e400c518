"""The request bodies of the OpenAI-compatible API, as typed models.

Each model checks its fields (a bad one is a 400 that names it, in OpenAI's error shape) and
builds the ``GenerationRequest`` the session runs. Nothing here touches a model or a session.
"""

import json
import math
import re
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from handlers.openai_tools import (
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoice,
    functions_of,
    tool_instructions,
    tools_called_for,
    written_call,
)
from sessions import request_rules as rules
from sessions.errors import BadRequest, InvalidRequest, MaxLengthExceeded
from sessions.formats.tool_syntax import SERVER, ToolSyntax
from sessions.requests import GenerationRequest, SamplingParams

MAX_LOGIT_BIAS_ENTRIES = 1024
# Fields of OpenAI's API this server does not implement: set to anything but their "off"
# value, they are refused with a 400 that names them rather than silently ignored.
NOT_SUPPORTED = {
    "functions": (None, []), "function_call": (None, "none"), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "audio": (None,),
}

RequestModel = TypeVar("RequestModel", bound=BaseModel)
# How pydantic names the branch of a union in an error's path (``str``, ``list[...]``, a model's name).
UNION_BRANCH = re.compile(r"str|list\[.*\]|[A-Z]\w*|literal\[.*\]")


def non_finite_number(value: Any) -> Optional[float]:
    """The first infinite or NaN number in a parsed JSON value, at any depth; None if there is none.

    Python's JSON parser reads ``Infinity``, ``NaN`` and ``1e999`` (infinite): no setting takes
    them, and a JSON schema or tool parameters holding one cannot be written back as JSON.
    """
    pending = [value]
    while pending:  # a loop, not recursion: the value may be nested as deep as the parser allows
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return item
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def refuse_unsupported(body: Any, not_supported: Dict[str, Tuple[Any, ...]]) -> Any:
    """``body`` as it is, unless it sets a field of ``not_supported`` to anything but one of its
    "off" values, or holds a number that is not finite: then ``BadRequest`` naming the field."""
    if isinstance(body, dict):
        for field, off_values in not_supported.items():
            if field in body and body[field] not in off_values:
                raise BadRequest(f"{field} is not supported by this server", param=field)
        for field, value in body.items():
            number = non_finite_number(value)
            if number is not None:
                raise BadRequest(f"{field}: numbers must be finite, got {number}", param=field)
    return body


def validated(model: Type[RequestModel], body: Dict[str, Any]) -> RequestModel:
    """``body`` as a request of type ``model``, or ``BadRequest`` naming the field at fault
    (its path, e.g. ``messages.0.content``; ``param``: its top-level field)."""
    try:
        return model.model_validate(body)
    except BadRequest:
        raise
    except pydantic.ValidationError as error:
        # Where a value may be one of several shapes, the problem found deepest is in the shape it
        # came closest to; the branch names pydantic puts in the path (``str``, ``list[...]``) go.
        problem = max(error.errors(), key=lambda problem: len(problem["loc"]))
        path = [str(part) for part in problem["loc"] if not UNION_BRANCH.fullmatch(str(part))]
        message = problem["msg"].removeprefix("Value error, ")
        raise BadRequest(f"{'.'.join(path)}: {message}" if path else message,
                         param=path[0] if path else None) from None


class StreamOptions(BaseModel):
    """``stream_options``: whether the last event of a stream carries the token usage."""

    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema``: a named schema the reply must satisfy."""

    name: str = "response"
    description: Optional[str] = None
    schema_: Dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """``response_format``: free text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self

    def schema_text(self) -> Optional[str]:
        """The JSON schema the output must satisfy, as JSON text; None for free text."""
        if self.type == "json_object":
            return json.dumps({"type": "object"})
        if self.type == "json_schema":
            return json.dumps(self.json_schema.schema_)
        return None


class PredictionPart(BaseModel):
    """One text part of a prediction's content."""

    type: Literal["text"]
    text: str


class Prediction(BaseModel):
    """``prediction``: text the reply is expected to resemble (e.g. a file being edited). Steps
    draft from it; the reply is what it would be without it, only sooner where they match."""

    type: Literal["content"]
    content: Union[str, List[PredictionPart]]

    @property
    def text(self) -> str:
        """The predicted text."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class OpenAIRequest(BaseModel):
    """The fields completions and chat completions share, vLLM's extra sampling fields included."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, **rules.TEMPERATURE.field_limits())
    top_p: Optional[float] = Field(default=None, **rules.TOP_P.field_limits())
    top_k: Optional[int] = Field(default=None, **rules.TOP_K.field_limits())  # 0 or -1: off
    min_p: Optional[float] = Field(default=None, **rules.MIN_P.field_limits())
    repetition_penalty: Optional[float] = Field(default=None, **rules.REPETITION_PENALTY.field_limits())
    presence_penalty: Optional[float] = Field(default=None, **rules.PRESENCE_PENALTY.field_limits())
    frequency_penalty: Optional[float] = Field(default=None, **rules.FREQUENCY_PENALTY.field_limits())
    logit_bias: Optional[Dict[str, float]] = None
    seed: Optional[int] = Field(default=None, ge=-(2 ** 63), lt=2 ** 64)
    n: Optional[int] = Field(default=1, ge=1)  # choices: samples of the prompt, rows of one session
    stop: Union[None, str, List[str]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = None
    trace_route: bool = False  # our extension: the reply's ``route`` names the swarm servers that served it
    prediction: Optional[Prediction] = None
    speculative: bool = True  # our extension: false turns speculative decoding off for this request

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, body: Any) -> Any:
        return refuse_unsupported(body, NOT_SUPPORTED)

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, logit_bias: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
        if logit_bias is None:
            return None
        if len(logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} tokens may be biased")
        for token, bias in logit_bias.items():
            if not (token.isascii() and token.isdecimal()) or len(token) > 9:
                raise ValueError(f"keys are token ids; {token[:20]!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError("biases are between -100 and 100")
        return logit_bias

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: Union[None, str, List[str]]) -> Union[None, str, List[str]]:
        if isinstance(stop, list) and len(stop) > rules.MAX_STOP_SEQUENCES:
            raise ValueError(f"stop must be a string or a list of up to {rules.MAX_STOP_SEQUENCES} strings")
        return stop

    @classmethod
    def parse(cls: Type[RequestModel], body: Dict[str, Any]) -> RequestModel:
        """The typed request, or ``BadRequest`` naming the field at fault."""
        return validated(cls, body)

    @property
    def stop_strings(self) -> Tuple[str, ...]:
        """The client's stop strings, empty ones left out."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(stop for stop in stops if stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage event."""
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, tool_syntax: ToolSyntax = SERVER) -> SamplingParams:
        """Greedy at temperature 0, else sampled; every other choice setting as given. A tool call
        is held to ``tool_syntax``, the model's."""
        temperature = 1.0 if self.temperature is None else self.temperature
        schema = self.response_format.schema_text() if self.response_format is not None else None
        grammar = self.grammar(tool_syntax)
        if grammar is not None and schema is not None:
            raise BadRequest("response_format cannot be combined with tools that may be called",
                             param="response_format")
        return SamplingParams(
            do_sample=temperature > 0, temperature=temperature or 1.0, top_p=self.top_p,
            top_k=rules.top_k_or_none(self.top_k), min_p=self.min_p or None,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items()),
            seed=self.seed, json_schema=schema, lark_grammar=grammar, logprobs=self.logprob_alternatives())

    def grammar(self, tool_syntax: ToolSyntax) -> Optional[str]:
        """The grammar the reply must follow (tool calls written in ``tool_syntax``); None: free."""
        return None

    def logprob_alternatives(self) -> Optional[int]:
        """How many alternatives each token's log-probabilities list; None: none asked for."""
        return None

    @property
    def choices(self) -> int:
        """How many choices the reply has (``n``)."""
        return self.n or 1

    def check_choices(self, limit: int) -> None:
        """Raises ``InvalidRequest`` naming ``n`` if the client asks for more choices than ``limit``."""
        if self.choices > limit:
            raise InvalidRequest(f"n {self.choices} exceeds this server's limit of {limit} choices per request",
                                 param="n")

    @property
    def asked_max_tokens(self) -> Optional[int]:
        """The reply's token limit the client gave (``max_completion_tokens`` first), if any."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        """The name of the field that gave the limit, for errors."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def check_max_tokens(self, limit: int) -> None:
        """Raises ``InvalidRequest`` if the client asks for more than ``limit`` new tokens (checked
        before the prompt is tokenized)."""
        asked = self.asked_max_tokens
        if asked is not None and asked > limit:
            raise InvalidRequest(f"{self.max_tokens_field} {asked} exceeds this model's limit of {limit} "
                                 "new tokens per request", param=self.max_tokens_field)

    def to_generation_request(self, prompt: str, prompt_ids: Sequence[int], sampling: SamplingParams,
                              context_length: int, default_max_tokens: int,
                              format_stops: Tuple[str, ...] = ()) -> GenerationRequest:
        """The generation to run (``prompt`` tokenized as ``prompt_ids``, tokens chosen as
        ``sampling`` says, from ``sampling_params``) in a model whose context holds
        ``context_length`` tokens: one token per reply, until a stop string, EOS or the token limit
        (by default ``default_max_tokens``, or what is left of the context if less)."""
        room = context_length - len(prompt_ids)
        if room < 1:
            raise MaxLengthExceeded(f"The prompt is {len(prompt_ids)} tokens; this model's context holds "
                                    f"{context_length}, with no room left for a reply", param="messages")
        max_tokens = self.asked_max_tokens or min(room, default_max_tokens)
        if max_tokens > room:
            raise MaxLengthExceeded(f"{self.max_tokens_field} {max_tokens} is more than the {room} tokens left in "
                                    f"this model's context of {context_length} after the prompt's "
                                    f"{len(prompt_ids)}", param=self.max_tokens_field)
        return GenerationRequest(
            inputs=prompt,
            input_ids=tuple(prompt_ids),
            max_length=len(prompt_ids) + max_tokens,
            max_new_tokens=1,
            sampling=sampling,
            extra_stop_sequences=self.stop_strings,
            format_stop_sequences=format_stops,
            until_length=True,
            trace_route=self.trace_route,
            prediction=self.prediction.text if self.prediction is not None else None,
            speculative=self.speculative,
            choices=self.choices,
        )


class CompletionRequest(OpenAIRequest):
    """``POST /v1/completions``"""

    prompt: Union[str, List[str]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)

    def logprob_alternatives(self) -> Optional[int]:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Union[str, List[str]]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("prompt must be a non-empty string (or a list of one)")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt must be a non-empty string")
        return prompt


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: Optional[str] = None

    @model_validator(mode="after")
    def _text_only(self) -> "ContentPart":
        if self.type != "text":
            raise ValueError(f"only text content parts are supported, not {self.type!r}")
        if self.text is None:
            raise ValueError("a text part needs its text")
        return self


class ChatMessage(BaseModel):
    """One message of a conversation; its content is a string or a list of text parts. An
    assistant message may carry the tool calls it made, and a ``tool`` message a call's result."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: Union[str, List[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_turn(self) -> Dict[str, str]:
        """The message as a ``{"role", "content"}`` turn of the model's chat format."""
        if self.role == "tool":  # the model's format has no tool role: the result comes as the user's
            call = f" {self.tool_call_id}" if self.tool_call_id else ""
            return {"role": "user", "content": f"Result of the tool call{call}: {self.text}"}
        if self.role == "assistant" and self.tool_calls:
            return {"role": "assistant", "content": self.text + "".join(map(written_call, self.tool_calls))}
        return {"role": self.chat_role, "content": self.text}

    @property
    def chat_role(self) -> str:
        """The role as chat formats and templates know it: OpenAI's newer name for the system role (its
        reasoning models' instructions) is the system role."""
        return "system" if self.role == "developer" else self.role

    def template_message(self, called: Dict[str, str]) -> Dict[str, Any]:
        """The message as a chat template takes it; ``called`` names the function of each earlier
        call by its id (a tool result's ``name``, unless the client gave one)."""
        message: Dict[str, Any] = {"role": self.chat_role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [call.template_call() for call in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
            name = self.name or called.get(self.tool_call_id)
            if name:
                message["name"] = name
        return message


class ChatCompletionRequest(OpenAIRequest):
    """``POST /v1/chat/completions``"""

    messages: List[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[List[Tool]] = Field(default=None, max_length=128)
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None  # accepted; a reply makes at most one call

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _choice_among_tools(self) -> "ChatCompletionRequest":
        if self.tool_choice not in (None, "none") and not self.tools:
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        try:
            self.callable_tools()
        except ValueError as error:
            raise BadRequest(str(error), param="tool_choice") from None
        return self

    def logprob_alternatives(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def callable_tools(self) -> List[Tool]:
        """The tools the reply may call (none unless ``tools`` are given; all of them by default)."""
        return tools_called_for(self.tools or [], self.tool_choice or "auto")

    def grammar(self, tool_syntax: ToolSyntax) -> Optional[str]:
        tools = self.callable_tools()
        if not tools:
            return None
        return tool_syntax.grammar(functions_of(tools), required=self.tool_choice == "required"
                                   or isinstance(self.tool_choice, NamedToolChoice))

    def template_messages(self) -> List[Dict[str, Any]]:
        """The messages as a model's chat template takes them (OpenAI's shape, a call's arguments as
        an object, a tool result with the name of the function that gave it)."""
        called = {call.id: call.function.name for message in self.messages for call in message.tool_calls or ()
                  if call.id is not None}
        return [message.template_message(called) for message in self.messages]

    def template_tools(self) -> Optional[List[Dict[str, Any]]]:
        """The tools the reply may call, as a chat template takes them (None: no tools)."""
        tools = self.callable_tools()
        return [tool.model_dump(exclude_none=True) for tool in tools] if tools else None

    def conversation(self) -> List[Dict[str, str]]:
        """The messages as ``{"role", "content"}`` turns of the server's own chat format, the tools
        described in the system message (for a model whose chat template knows no tools)."""
        turns = [message.as_turn() for message in self.messages]
        tools = self.callable_tools()
        if tools:
            if turns[0]["role"] == "system":
                turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + tool_instructions(tools)}
            else:
                turns.insert(0, {"role": "system", "content": tool_instructions(tools)})
        return turns
