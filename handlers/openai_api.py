"""An OpenAI-compatible API under ``/v1``: models, completions and chat completions.

Requests are parsed into the typed models of ``handlers.openai_protocol`` and run through the
same session manager as the other APIs, in a session of their own; replies are the typed models
of ``handlers.openai_replies``. A full reply and a stream are written by separate methods;
streamed replies are server-sent events ending with ``data: [DONE]``. A request with our
extension ``"trace_route": true`` gets the generation's route through the swarm as ``route`` (on
the last event of a stream). Stop strings never reach the client, also when they span tokens:
the session holds back text that could begin one.
"""

import logging
import time
from typing import Any, Dict, List, Tuple

from config import HEADER_NAME
from handlers.base import GenerationHandler
from handlers.openai_choices import SeveralChoices
from handlers.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from handlers.openai_replies import ChatReplies, CompletionReplies, ModelCard, ModelList
from sessions.engine.grammar import constrained
from sessions.errors import InvalidRequest, error_payload, log_error
from sessions.formats.chat_template import ChatTemplateError
from sessions.models import LoadedModel
from sessions.requests import GenerationRequest, SamplingParams

logger = logging.getLogger(__name__)

CORS_MAX_AGE_SECONDS = 600
# Headers a page may always send, and how many more (and how long) a preflight may ask for:
# OpenAI's JavaScript client adds about ten of its own (x-stainless-os, x-stainless-retry-count, ...).
CORS_HEADERS = ("Authorization", "Content-Type")
MAX_CORS_EXTRA_HEADERS = 32
MAX_CORS_HEADER_CHARS = 64


class OpenAIHandler(GenerationHandler):
    """Shared parts: OpenAI-shaped errors, and CORS for pages that call the API from a browser
    (any origin, or those of ``--allowed-origins``)."""

    api = "openai"
    connection_prefix = "openai-"
    shows_rate_limits = True
    cors_methods = "GET, POST, OPTIONS"  # what a preflight allows a page to send here

    def set_default_headers(self) -> None:
        super().set_default_headers()
        origin = self.request.headers.get("Origin")
        allowed = self.config.allowed_origins
        if origin and (not allowed or origin in allowed):
            self.set_header("Access-Control-Allow-Origin", "*" if not allowed else origin)
            self.set_header("Vary", "Origin")

    def options(self) -> None:
        """A browser's CORS preflight: which methods and headers a page may use (the headers it
        asks for, within bounds)."""
        self.set_status(204)
        self.set_header("Access-Control-Allow-Methods", self.cors_methods)
        requested = self.request.headers.get("Access-Control-Request-Headers", "")
        self.set_header("Access-Control-Allow-Headers", ", ".join(allowed_headers(requested)))
        self.set_header("Access-Control-Max-Age", str(CORS_MAX_AGE_SECONDS))
        self.set_header("Vary", "Origin, Access-Control-Request-Headers")  # a cache must not answer others with it
        self.clear_header("Content-Type")
        self.finish()


def allowed_headers(requested: str) -> List[str]:
    """The headers a preflight allows: ours, then those of ``requested`` (a comma-separated list)
    that are header names of at most ``MAX_CORS_HEADER_CHARS`` characters, the first
    ``MAX_CORS_EXTRA_HEADERS`` of them. A header left out makes the browser refuse the request."""
    allowed = {name.lower(): name for name in CORS_HEADERS}  # header names are case-insensitive
    for name in (part.strip() for part in requested.split(",")):
        if len(allowed) == len(CORS_HEADERS) + MAX_CORS_EXTRA_HEADERS:
            break
        if len(name) <= MAX_CORS_HEADER_CHARS and HEADER_NAME.fullmatch(name):
            allowed.setdefault(name.lower(), name)
    return list(allowed.values())


# What every model served here supports: tools (through its template's call syntax, or the
# server's own instructions), structured output (JSON schemas, grammars) and log-probabilities.
CAPABILITIES = ["completion", "chat", "tools", "structured_output", "logprobs"]


def model_card(loaded: LoadedModel) -> ModelCard:
    """A served model as ``/v1/models`` lists it."""
    spec = loaded.spec
    return ModelCard(id=spec.key, owned_by=spec.family, root=spec.repository,
                     max_model_len=spec.chat.max_session_length, max_output_tokens=spec.max_new_tokens_limit,
                     capabilities=CAPABILITIES)


class ModelListHandler(OpenAIHandler):
    """``GET /v1/models``: the models this API serves."""

    def get(self) -> None:
        self.write(ModelList(data=[model_card(loaded) for loaded in self.manager.registry.public_models()]).json_text())


class CompletionHandler(SeveralChoices, OpenAIHandler):
    """``POST /v1/completions``; ``ChatCompletionHandler`` changes the prompt and the replies."""

    request_model = CompletionRequest
    streaming = False  # whether this request's reply is an event stream
    event_stream_started = False  # whether its headers went out (an error is then an event)

    async def prompt(self, body: OpenAIRequest, loaded: LoadedModel,
                     sampling: SamplingParams) -> Tuple[str, Tuple[str, ...]]:
        """The prompt text, and the stop strings its format adds (the end-of-sequence token's text,
        which the reply must not show)."""
        eos_token = loaded.tokenizer.eos_token
        return body.prompt, (eos_token,) if eos_token else ()

    def replies_for(self, body: OpenAIRequest, loaded: LoadedModel, prompt: str) -> CompletionReplies:
        """The builder of this request's replies."""
        return CompletionReplies(loaded.spec.key, int(time.time()), body.logprob_alternatives() is not None,
                                 text_offset=len(prompt))

    def parse_body(self) -> OpenAIRequest:
        """The body as the request it makes."""
        return self.request_model.parse(self.json_body())

    async def post(self) -> None:
        body = self.parse_body()
        loaded = self.manager.find_model(body.model, self.client, trusted=False)
        spec = loaded.spec
        body.check_max_tokens(spec.max_new_tokens_limit)
        body.check_choices(self.config.max_choices)
        sampling = body.sampling_params(loaded.tool_syntax)
        await self.manager.check_constraint(loaded, sampling)  # a schema is refused before the prompt is tokenized
        prompt, format_stops = await self.prompt(body, loaded, sampling)
        prompt_ids = await self.manager.tokenize(loaded, prompt, self.client)
        request = body.to_generation_request(prompt, prompt_ids, sampling, spec.chat.max_session_length,
                                             min(spec.default_max_tokens, spec.max_new_tokens_limit), format_stops)
        replies = self.replies_for(body, loaded, prompt)
        self.streaming = body.stream
        if request.choices > 1:  # a builder per choice, each with the request's id
            choices = [replies, *(self.replies_for(body, loaded, prompt).as_choice(replies, index)
                                  for index in range(1, request.choices))]
            await self.several_choices_reply(loaded, request, choices, len(prompt_ids), body.include_usage)
        elif body.stream:
            await self.stream_reply(loaded, request, replies, len(prompt_ids), body.include_usage)
        else:
            await self.full_reply(loaded, request, replies, len(prompt_ids))

    async def full_reply(self, loaded: LoadedModel, request: GenerationRequest, replies: CompletionReplies,
                         prompt_tokens: int) -> None:
        """Generates the whole reply, then answers it as one JSON object (one choice of ``SeveralChoices``)."""
        await self.whole_choices(loaded, request, [replies], prompt_tokens)

    async def send_event(self, data: str) -> None:
        """Writes one server-sent event (``data``: JSON text, or ``[DONE]``) and flushes it."""
        self.start_event_stream()
        self.write(f"data: {data}\n\n")
        await self.flush()

    def start_event_stream(self) -> None:
        """Sets the headers of an event stream, before the first thing written."""
        if not self.event_stream_started:
            self.event_stream_started = True
            self.set_header("Content-Type", "text/event-stream; charset=UTF-8")
            self.set_header("Cache-Control", "no-cache")

    def queued(self, position: int) -> None:
        """A stream tells its client its place in line as an SSE comment, which clients skip."""
        if self.streaming and not self.client_left:
            self.start_event_stream()
            self.write(f": queued, position {position}\n\n")
            self.flush().add_done_callback(lambda flushed: flushed.exception())  # a closed stream is noticed later

    async def stream_reply(self, loaded: LoadedModel, request: GenerationRequest, replies: CompletionReplies,
                           prompt_tokens: int, include_usage: bool) -> None:
        """Streams the reply as events (one choice of ``SeveralChoices``)."""
        await self.stream_choices(loaded, request, [replies], prompt_tokens, include_usage)

    def stream_error(self, error: Exception) -> Dict[str, Any]:
        """The error event's payload for a stream that failed after it started (logged and counted)."""
        classified = log_error(logger, f"[{self.connection_id}] Stream failed", error)
        self.manager.metrics.count_error(classified.code)
        return error_payload(classified, self.api)


class ChatCompletionHandler(CompletionHandler):
    """``POST /v1/chat/completions``: messages rendered into a prompt in the model's chat format."""

    request_model = ChatCompletionRequest

    async def prompt(self, body: ChatCompletionRequest, loaded: LoadedModel,
                     sampling: SamplingParams) -> Tuple[str, Tuple[str, ...]]:
        """The conversation through the model's chat template when it describes tools, else in the
        model's chat format; rendered in the tokenizer's threads (CPU work on the client's text)."""
        chat_format, template = loaded.chat_format, loaded.tool_template

        def render() -> str:
            if template is None:
                return chat_format.render(body.conversation())
            # A reply held to a grammar or schema has no room for thinking first.
            return template.render(body.template_messages(), body.template_tools(), add_generation_prompt=True,
                                   thinking=not constrained(sampling))

        try:
            prompt = await self.manager.tokenizer_pool.run(self.client, render)
        except ChatTemplateError as error:
            raise InvalidRequest(f"messages: {error}", param="messages") from None
        return prompt, tuple(chat_format.stop_sequences)

    def replies_for(self, body: ChatCompletionRequest, loaded: LoadedModel, prompt: str) -> ChatReplies:
        return ChatReplies(loaded.spec.key, int(time.time()), body.logprob_alternatives() is not None,
                           loaded.tool_syntax if body.callable_tools() else None)
