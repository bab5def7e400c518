"""The request bodies of the OpenAI-compatible API, as typed models.

Each model checks its fields (a bad one is a 400 that names it, in OpenAI's error shape) and
builds the ``GenerationRequest`` the session runs. Nothing here touches a model or a session.
"""

from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sessions.errors import BadRequest
from sessions.requests import GenerationRequest, SamplingParams

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # chat replies stop at the model's end of turn long before this
MAX_STOP_STRINGS = 4

RequestModel = TypeVar("RequestModel", bound="OpenAIRequest")


class StreamOptions(BaseModel):
    """``stream_options``: whether the last event of a stream carries the token usage."""

    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")
    default_max_tokens: ClassVar[int] = DEFAULT_COMPLETION_TOKENS

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: Optional[int] = 1
    stop: Union[None, str, List[str]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: Optional[int]) -> Optional[int]:
        if n not in (1, None):
            raise ValueError("Only n = 1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: Union[None, str, List[str]]) -> Union[None, str, List[str]]:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings")
        return stop

    @classmethod
    def parse(cls: Type[RequestModel], body: Dict[str, Any]) -> RequestModel:
        """The typed request, or ``BadRequest`` naming the first field at fault."""
        try:
            return cls.model_validate(body)
        except pydantic.ValidationError as error:
            problem = error.errors()[0]
            field = ".".join(str(part) for part in problem["loc"]) or None
            message = problem["msg"].removeprefix("Value error, ")
            raise BadRequest(f"{field}: {message}" if field else message,
                             param=str(problem["loc"][0]) if problem["loc"] else None) from None

    @property
    def stop_strings(self) -> Tuple[str, ...]:
        """The client's stop strings, empty ones left out."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(stop for stop in stops if stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage event."""
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self) -> SamplingParams:
        """Greedy at temperature 0, else sampled."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(do_sample=temperature > 0, temperature=temperature or 1.0, top_p=self.top_p)

    def to_generation_request(self, prompt: str, prompt_ids: Sequence[int], format_stops: Tuple[str, ...] = ()
                              ) -> GenerationRequest:
        """The generation to run (``prompt`` tokenized as ``prompt_ids``): one token per reply,
        until a stop string, EOS or the token limit."""
        max_tokens = self.max_completion_tokens or self.max_tokens or self.default_max_tokens
        return GenerationRequest(
            inputs=prompt,
            input_ids=tuple(prompt_ids),
            max_length=len(prompt_ids) + max_tokens,
            max_new_tokens=1,
            sampling=self.sampling_params(),
            extra_stop_sequences=tuple(dict.fromkeys(self.stop_strings + format_stops)),
            until_length=True,
        )


class CompletionRequest(OpenAIRequest):
    """``POST /v1/completions``"""

    prompt: Union[str, List[str]]

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


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str


class ChatCompletionRequest(OpenAIRequest):
    """``POST /v1/chat/completions``"""

    default_max_tokens: ClassVar[int] = DEFAULT_CHAT_TOKENS

    messages: List[ChatMessage] = Field(min_length=1)

    def conversation(self) -> List[Dict[str, str]]:
        """The messages as ``{"role", "content"}`` dictionaries."""
        return [{"role": message.role, "content": message.content} for message in self.messages]
