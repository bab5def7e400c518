"""An OpenAI-compatible API under ``/v1``: models, completions and chat completions.

Requests are parsed into the typed models of ``handlers.openai_protocol`` and run through the
same session manager as the other APIs, in a session of their own. A full reply and a
stream are written by separate methods; streamed replies are server-sent events ending with
``data: [DONE]``. A request with our extension ``"trace_route": true`` gets the generation's
route through the swarm as ``route`` (on the last event of a stream). Stop strings never reach the client, also when they span tokens: the
session holds back text that could begin one.
"""

import itertools
import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import tornado.iostream

from config import HEADER_NAME
from handlers.base import GenerationHandler
from handlers.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from handlers.openai_tools import openai_tool_call
from sessions.engine.grammar import constrained
from sessions.errors import InvalidRequest, error_payload, log_error
from sessions.formats.chat_template import ChatTemplateError
from sessions.models import LoadedModel
from sessions.requests import (
    ChosenTokenLogprobs,
    GenerationRequest,
    GenerationUpdate,
    PredictionTokens,
    SamplingParams,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

CORS_MAX_AGE_SECONDS = 600
# Headers a page may always send, and how many more (and how long) a preflight may ask for:
# OpenAI's JavaScript client adds about ten of its own (x-stainless-os, x-stainless-retry-count, ...).
CORS_HEADERS = ("Authorization", "Content-Type")
MAX_CORS_EXTRA_HEADERS = 32
MAX_CORS_HEADER_CHARS = 64
# OpenAI's replies name the backend configuration that produced them; ours is this server.
SYSTEM_FINGERPRINT = "fp_swarm_chat"


class OpenAIHandler(GenerationHandler):
    """Shared parts: OpenAI-shaped errors, and CORS for pages that call the API from a browser
    (any origin, or those of ``--allowed-origins``)."""

    api = "openai"
    connection_prefix = "openai-"

    def set_default_headers(self) -> None:
        super().set_default_headers()
        origin = self.request.headers.get("Origin")
        allowed = self.settings.get("allowed_origins") or ()
        if origin and (not allowed or origin in allowed):
            self.set_header("Access-Control-Allow-Origin", "*" if not allowed else origin)
            self.set_header("Vary", "Origin")

    def options(self) -> None:
        """A browser's CORS preflight: which methods and headers a page may use (the headers it
        asks for, within bounds)."""
        self.set_status(204)
        self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
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


class ModelListHandler(OpenAIHandler):
    """``GET /v1/models``: the models this API serves."""

    def get(self) -> None:
        self.write({"object": "list", "data": [
            {"id": loaded.spec.key, "object": "model", "created": 0, "owned_by": loaded.spec.family}
            for loaded in self.manager.registry.public_models()]})


def openai_finish_reason(update: GenerationUpdate) -> str:
    """OpenAI's ``finish_reason`` for the last reply of a generation."""
    return "length" if update.finish_reason == "length" and not update.stopped_by_sequence else "stop"


class CompletionHandler(OpenAIHandler):
    """``POST /v1/completions``; ``ChatCompletionHandler`` changes the prompt and the reply's shape."""

    request_model = CompletionRequest
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    async def prompt(self, body: OpenAIRequest, loaded: LoadedModel,
                     sampling: SamplingParams) -> Tuple[str, Tuple[str, ...]]:
        """The prompt text, and the stop strings its format adds (the end-of-sequence token's text,
        which the reply must not show)."""
        eos_token = loaded.tokenizer.eos_token
        return body.prompt, (eos_token,) if eos_token else ()

    def choice(self, text: str, finish_reason: Optional[str],
               logprobs: Optional[Sequence[ChosenTokenLogprobs]]) -> Dict[str, Any]:
        """The one choice of a full reply (``logprobs``: None unless the request asked)."""
        return {"index": 0, "text": text, "logprobs": self.completion_logprobs(logprobs),
                "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: Optional[str], first: bool,
                     logprobs: Optional[Sequence[ChosenTokenLogprobs]]) -> Dict[str, Any]:
        """The one choice of a streamed event."""
        return self.choice(text, finish_reason, logprobs)

    def completion_logprobs(self, logprobs: Optional[Sequence[ChosenTokenLogprobs]]) -> Optional[Dict[str, Any]]:
        """Log-probabilities as ``/v1/completions`` gives them: parallel lists per token."""
        if logprobs is None:
            return None
        offsets = list(itertools.accumulate((len(step.chosen.text) for step in logprobs[:-1]),
                                            initial=self.text_offset))
        self.text_offset += sum(len(step.chosen.text) for step in logprobs)
        return {"tokens": [step.chosen.text for step in logprobs],
                "token_logprobs": [step.chosen.logprob for step in logprobs],
                "top_logprobs": [{top.text: top.logprob for top in step.top} for step in logprobs],
                "text_offset": offsets}

    async def post(self) -> None:
        body = self.request_model.parse(self.json_body())
        self.wants_logprobs = body.logprob_alternatives() is not None
        loaded = self.manager.registry.find(body.model, trusted=False)
        self.prepare_reply(body, loaded)
        spec = loaded.spec
        body.check_max_tokens(spec.max_new_tokens_limit)
        sampling = body.sampling_params(loaded.tool_syntax)
        await self.manager.check_constraint(loaded, sampling)  # a schema is refused before the prompt is tokenized
        prompt, format_stops = await self.prompt(body, loaded, sampling)
        prompt_ids = await self.manager.tokenize(loaded, prompt, self.client)
        request = body.to_generation_request(prompt, prompt_ids, sampling, spec.chat.max_session_length,
                                             min(spec.default_max_tokens, spec.max_new_tokens_limit), format_stops)
        prompt_tokens = len(prompt_ids)
        self.text_offset = len(prompt)  # where the reply's text starts, as completions' logprobs count
        self.started = int(time.time())
        self.completion_id = self.id_prefix + uuid.uuid4().hex[:24]
        if body.stream:
            await self.stream_reply(loaded.spec.key, request, prompt_tokens, body.include_usage)
        else:
            await self.full_reply(loaded.spec.key, request, prompt_tokens)

    def prepare_reply(self, body: OpenAIRequest, loaded: LoadedModel) -> None:
        """Notes what the reply's shape depends on in the request and the model, before generating."""

    def envelope(self, model: str, object_name: str, choices: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The fields every reply and event has."""
        return {"id": self.completion_id, "object": object_name, "created": self.started, "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}

    def usage(self, prompt_tokens: int, completion_tokens: int,
              prediction: Optional[PredictionTokens]) -> Dict[str, Any]:
        """Token counts as OpenAI reports them; ``cached_tokens``: prompt tokens a warm session held;
        the prediction's tokens the model took and turned down."""
        prediction = prediction or PredictionTokens()
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"accepted_prediction_tokens": prediction.accepted,
                                              "rejected_prediction_tokens": prediction.rejected}}

    async def full_reply(self, model: str, request: GenerationRequest, prompt_tokens: int) -> None:
        """Generates the whole reply, then answers it as one JSON object."""
        pieces, tokens, last, logprobs = [], 0, None, []
        async with aclosing(self.generate(model, request)) as updates:
            async for last in updates:
                pieces.append(last.text)
                tokens += last.token_count
                logprobs.extend(last.logprobs)
        if self.client_left:  # maybe before anything was generated: nobody to answer
            return
        choice = self.choice("".join(pieces), openai_finish_reason(last), logprobs if self.wants_logprobs else None)
        reply = self.envelope(model, self.object_name, [choice])
        reply["usage"] = self.usage(prompt_tokens, tokens, last.prediction_tokens)
        if last.route is not None:
            reply["route"] = last.route
        self.write(reply)

    async def send_event(self, payload: Any) -> None:
        """Writes one server-sent event and flushes it."""
        self.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n")
        await self.flush()

    async def stream_reply(self, model: str, request: GenerationRequest, prompt_tokens: int,
                           include_usage: bool) -> None:
        """Streams the reply as events. An error before the first event is a plain HTTP error
        reply (so clients see its status); after it, an error event."""
        tokens, first, prediction = 0, True, None
        pending_logprobs: List[ChosenTokenLogprobs] = []  # of tokens whose text is still held back
        try:
            async with aclosing(self.generate(model, request)) as updates:
                async for update in updates:
                    tokens += update.token_count
                    prediction = update.prediction_tokens
                    finish_reason = openai_finish_reason(update) if update.stop else None
                    pending_logprobs.extend(update.logprobs)
                    if update.text or first or update.stop:
                        logprobs = pending_logprobs if self.wants_logprobs else None
                        pending_logprobs = []
                        if first:
                            self.set_header("Content-Type", "text/event-stream; charset=UTF-8")
                            self.set_header("Cache-Control", "no-cache")
                        choice = self.chunk_choice(update.text, finish_reason, first, logprobs)
                        event = self.envelope(model, self.chunk_object_name, [choice])
                        if update.route is not None:
                            event["route"] = update.route
                        await self.send_event(event)
                        first = False
            if self.client_left:  # maybe before anything was generated: nobody to answer
                return
            if include_usage:
                usage = self.envelope(model, self.chunk_object_name, [])
                usage["usage"] = self.usage(prompt_tokens, tokens, prediction)
                await self.send_event(usage)
        except tornado.iostream.StreamClosedError:
            return
        except Exception as error:
            if first:
                raise
            classified = log_error(logger, f"[{self.connection_id}] Stream failed", error)
            self.manager.metrics.count_error(classified.code)
            await self.send_event(error_payload(classified, "openai"))
        await self.send_event("[DONE]")


class ChatCompletionHandler(CompletionHandler):
    """``POST /v1/chat/completions``: messages rendered into a prompt in the model's chat format."""

    request_model = ChatCompletionRequest
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

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

    def prepare_reply(self, body: ChatCompletionRequest, loaded: LoadedModel) -> None:
        self.may_call_tools = bool(body.callable_tools())
        self.tool_syntax = loaded.tool_syntax
        self.calling: Optional[bool] = None  # streaming: whether the reply is a tool call (known from its start)
        self.call_text = ""

    def choice(self, text: str, finish_reason: Optional[str],
               logprobs: Optional[Sequence[ChosenTokenLogprobs]]) -> Dict[str, Any]:
        call = self.tool_syntax.parse(text) if self.may_call_tools else None
        if call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [openai_tool_call(call)]}
            finish_reason = "tool_calls"
        else:
            message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": self.chat_logprobs(logprobs),
                "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: Optional[str], first: bool,
                     logprobs: Optional[Sequence[ChosenTokenLogprobs]]) -> Dict[str, Any]:
        delta: Dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        if self.may_call_tools:
            if self.calling is None and text:
                self.calling = self.tool_syntax.starts_call(text)  # free text never begins like a call
            if self.calling:  # the call is sent whole, once written
                self.call_text += text
                call = self.tool_syntax.parse(self.call_text) if finish_reason is not None else None
                delta = {"role": "assistant"} if first else {}
                if call is not None:
                    delta["tool_calls"] = [dict(openai_tool_call(call), index=0)]
                    finish_reason = "tool_calls"
                elif finish_reason is not None:
                    delta["content"] = self.call_text  # cut short (max_tokens): the text as written
        return {"index": 0, "delta": delta, "logprobs": self.chat_logprobs(logprobs), "finish_reason": finish_reason}

    @staticmethod
    def chat_logprobs(logprobs: Optional[Sequence[ChosenTokenLogprobs]]) -> Optional[Dict[str, Any]]:
        """Log-probabilities as chat completions give them: one entry per token."""
        if logprobs is None:
            return None

        def entry(token: TokenLogprob) -> Dict[str, Any]:
            return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode())}

        return {"content": [dict(entry(step.chosen), top_logprobs=[entry(top) for top in step.top])
                            for step in logprobs]}
