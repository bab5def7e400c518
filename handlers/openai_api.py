"""An OpenAI-compatible API under ``/v1``: models, completions and chat completions.

Requests run through the same session manager as the other APIs, in a session of their own.
Streamed replies are server-sent events ending with ``data: [DONE]``; stop strings never leak
into the text, also when they span tokens: text that could begin a stop string is held back
until it cannot.
"""

import json
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import tornado.iostream

from handlers.base import GenerationHandler
from handlers.protocol import ProtocolError, optional_bool, optional_float, optional_int
from sessions.errors import SessionError
from sessions.generation import SamplingParams
from sessions.session import GenerationRequest

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # chat replies stop at the model's end of turn long before this
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               409: "invalid_request_error", 503: "server_error"}


class OpenAIError(ProtocolError):
    """A request error with the OpenAI fields ``param`` and ``code``."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.openai_code, self.status = param, code, status


class StopStringFilter:
    """Cuts generated text at the first stop string; holds back what could be one's beginning."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [stop for stop in stops if stop]
        self._pending = ""
        self.matched = False

    def push(self, text: str) -> str:
        """Adds generated text; returns the part that is safe to send."""
        if self.matched:
            return ""
        self._pending += text
        cut = min((self._pending.find(stop) for stop in self.stops if stop in self._pending), default=-1)
        if cut >= 0:
            self.matched = True
            safe, self._pending = self._pending[:cut], ""
            return safe
        hold = max((length for stop in self.stops for length in range(1, len(stop))
                    if self._pending.endswith(stop[:length])), default=0)
        safe, self._pending = self._pending[: len(self._pending) - hold], self._pending[len(self._pending) - hold:]
        return safe

    def flush(self) -> str:
        """At the end: the held-back text that turned out not to be a stop string."""
        safe, self._pending = ("" if self.matched else self._pending), ""
        return safe


def _stop_strings(body: Dict[str, Any]) -> Tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop) or len(stop) > 4:
        raise OpenAIError("stop must be a string or a list of up to 4 strings", param="stop")
    return tuple(item for item in stop if item)


class OpenAIHandler(GenerationHandler):
    """Shared parts: API key, OpenAI-shaped errors."""

    connection_prefix = "openai-"

    def initialize(self, manager, api_key: Optional[str] = None) -> None:
        super().initialize(manager)
        self.api_key = api_key

    def prepare(self) -> None:
        super().prepare()
        if self.api_key and self.request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            raise OpenAIError("Invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                              status=401)

    def error_status(self, error: Optional[BaseException], default: int) -> int:
        if isinstance(error, OpenAIError):
            return error.status
        return super().error_status(error, default)

    def error_body(self, message: str, error: Optional[BaseException]) -> Dict[str, Any]:
        status = self.get_status()
        details = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": None, "code": None}
        if isinstance(error, OpenAIError):
            details.update(param=error.param, code=error.openai_code)
        elif isinstance(error, (ProtocolError, SessionError)):
            details["code"] = error.code
            if error.code == "unknown_model":
                details.update(param="model", code="model_not_found")
        return {"error": details}



class ModelListHandler(OpenAIHandler):
    """``GET /v1/models``"""

    def get(self) -> None:
        self.write({"object": "list", "data": [
            {"id": loaded.spec.key, "object": "model", "created": 0, "owned_by": loaded.spec.family}
            for loaded in self.manager.models]})


class CompletionHandler(OpenAIHandler):
    """``POST /v1/completions`` and, through ``render_prompt``, ``POST /v1/chat/completions``."""

    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"
    default_max_tokens = DEFAULT_COMPLETION_TOKENS

    def render_prompt(self, body: Dict[str, Any], model: str) -> Tuple[str, Tuple[str, ...]]:
        """The prompt text, and stop strings the format adds."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise OpenAIError("prompt must be a non-empty string", param="prompt")
        return prompt, ()

    def choice(self, text: str, finish_reason: Optional[str]) -> Dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: Optional[str], first: bool) -> Dict[str, Any]:
        return self.choice(text, finish_reason)

    async def post(self) -> None:
        body = self.json_body()
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise OpenAIError("model is required", param="model")
        if body.get("n", 1) != 1:
            raise OpenAIError("Only n = 1 is supported", param="n")
        prompt, format_stops = self.render_prompt(body, model)
        stops = _stop_strings(body) + format_stops
        max_tokens = optional_int(body, "max_completion_tokens") or optional_int(body, "max_tokens")
        temperature = optional_float(body, "temperature", 0.0, 2.0, low_inclusive=True)
        temperature = 1.0 if temperature is None else temperature
        prompt_tokens = await self.manager.count_tokens(model, prompt)
        request = GenerationRequest(
            inputs=prompt,
            max_length=prompt_tokens + (max_tokens or self.default_max_tokens),
            max_new_tokens=1,
            sampling=SamplingParams(do_sample=temperature > 0, temperature=temperature or 1.0,
                                    top_p=optional_float(body, "top_p", 0.0, 1.0)),
            extra_stop_sequences=stops,
            until_length=True,
        )
        self.started = int(time.time())
        self.completion_id = self.id_prefix + uuid.uuid4().hex[:24]
        if optional_bool(body, "stream"):
            await self.stream(model, request, stops, prompt_tokens, body)
        else:
            await self.complete(model, request, stops, prompt_tokens)

    def envelope(self, model: str, object_name: str, choices: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"id": self.completion_id, "object": object_name, "created": self.started, "model": model,
                "choices": choices}

    async def complete(self, model: str, request: GenerationRequest, stops, prompt_tokens: int) -> None:
        text_filter, pieces, tokens, finish_reason = StopStringFilter(stops), [], 0, None
        async for update in self.manager.one_shot(self.connection_id, model, request, self.request.remote_ip):
            pieces.append(text_filter.push(update.outputs))
            tokens += update.token_count
            finish_reason = update.finish_reason
        pieces.append(text_filter.flush())
        reply = self.envelope(model, self.object_name, [self.choice(
            "".join(pieces), "stop" if text_filter.matched else _openai_finish(finish_reason))])
        reply["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                          "total_tokens": prompt_tokens + tokens}
        self.write(reply)

    async def send_event(self, payload: Any) -> None:
        self.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n")
        await self.flush()

    async def stream(self, model: str, request: GenerationRequest, stops, prompt_tokens: int,
                     body: Dict[str, Any]) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=UTF-8")
        self.set_header("Cache-Control", "no-cache")
        text_filter, tokens, first, finish_reason = StopStringFilter(stops), 0, True, None
        try:
            async for update in self.manager.one_shot(self.connection_id, model, request, self.request.remote_ip):
                tokens += update.token_count
                finish_reason = update.finish_reason
                text = text_filter.push(update.outputs)
                if text or first:
                    await self.send_event(self.envelope(model, self.chunk_object_name,
                                                        [self.chunk_choice(text, None, first)]))
                    first = False
            tail = text_filter.flush()
            reason = "stop" if text_filter.matched else _openai_finish(finish_reason)
            await self.send_event(self.envelope(model, self.chunk_object_name,
                                                [self.chunk_choice(tail, reason, first)]))
            if isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage"):
                usage = self.envelope(model, self.chunk_object_name, [])
                usage["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                  "total_tokens": prompt_tokens + tokens}
                await self.send_event(usage)
        except (ProtocolError, SessionError) as error:
            # Headers are out: the error travels as an event, as OpenAI's own streams do.
            self.manager.metrics.count_error(error.code)
            await self.send_event(self.error_body(str(error), error))
        except tornado.iostream.StreamClosedError:
            return
        await self.send_event("[DONE]")


def _openai_finish(reason: Optional[str]) -> str:
    return "length" if reason == "length" else "stop"


class ChatCompletionHandler(CompletionHandler):
    """``POST /v1/chat/completions``: messages rendered into a prompt for the model."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"
    default_max_tokens = DEFAULT_CHAT_TOKENS

    def render_prompt(self, body: Dict[str, Any], model: str) -> Tuple[str, Tuple[str, ...]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise OpenAIError("messages must be a non-empty list of {role, content} objects", param="messages")
        loaded = self.manager.find_model(model)
        chat = loaded.spec.chat
        if getattr(loaded.tokenizer, "chat_template", None):
            prompt = loaded.tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages],
                tokenize=False, add_generation_prompt=True)
        else:
            turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            prompt = chat.sep_token.join(turns) + chat.sep_token + "Assistant:"
        return prompt, tuple(filter(None, (loaded.stop_token, *chat.extra_stop_sequences)))

    def choice(self, text: str, finish_reason: Optional[str]) -> Dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: Optional[str], first: bool) -> Dict[str, Any]:
        delta: Dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
