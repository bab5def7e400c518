"""OpenAI's Responses API: ``POST /v1/responses``, and ``GET``/``DELETE /v1/responses/{id}``.

A request is run as the chat completion it amounts to (``handlers.responses_protocol``), in a
session of its own or a warm one it continues. A stored response (``store``, on by default)
keeps its conversation, as messages and as the model's own tokens; a request that names it as
``previous_response_id`` begins with exactly those tokens, so the warm session that wrote them
takes the request on and only the new turn goes through the swarm (``cached_tokens`` says how
many were spared). A stream is server-sent events, each named by its type.
"""

import json
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import tornado.iostream

from handlers.openai_api import ChatCompletionHandler, OpenAIHandler
from handlers.responses_protocol import ResponseRequest
from handlers.responses_replies import ResponseReplies, ResponseUsage, new_id
from sessions.errors import InvalidRequest, UnknownResponse
from sessions.models import LoadedModel
from sessions.requests import GenerationRequest, GenerationUpdate
from sessions.serving.response_store import StoredResponse

logger = logging.getLogger(__name__)


class ResponsesHandler(ChatCompletionHandler):
    """``POST /v1/responses``."""

    async def post(self) -> None:
        body = ResponseRequest.parse(self.json_body())
        previous = self.previous_response(body.previous_response_id)
        conversation = body.conversation(previous.messages if previous is not None else ())
        chat = body.chat_request(conversation)
        loaded = self.manager.find_model(chat.model, self.client, trusted=False)
        spec = loaded.spec
        chat.check_max_tokens(spec.max_new_tokens_limit)
        sampling = chat.sampling_params(loaded.tool_syntax)
        await self.manager.check_constraint(loaded, sampling)  # a schema is refused before the prompt is tokenized
        prompt, format_stops = await self.prompt(chat, loaded, sampling)
        prompt_ids = await self.prompt_ids(loaded, prompt, previous)
        request = chat.to_generation_request(prompt, prompt_ids, sampling, spec.chat.max_session_length,
                                             min(spec.default_max_tokens, spec.max_new_tokens_limit), format_stops)
        replies = ResponseReplies.starting(new_id("resp"), spec.key, body,
                                           loaded.tool_syntax if chat.callable_tools() else None)
        run = ResponseRun(self, loaded, request, replies, len(prompt_ids))
        self.streaming = body.stream
        finished = await (run.stream() if body.stream else run.whole())
        if finished is not None and body.store:
            self.keep(replies, loaded, [message.model_dump(exclude_none=True) for message in conversation], prompt,
                      finished)

    def previous_response(self, response_id: Optional[str]) -> Optional[StoredResponse]:
        """The stored response a request continues, if it names one; a 400 naming
        ``previous_response_id`` when this client has none by that id."""
        if response_id is None:
            return None
        previous = self.responses.get(response_id, self.client)
        if previous is None:
            raise InvalidRequest(f"Previous response with id {response_id!r} not found", param="previous_response_id")
        return previous

    async def prompt_ids(self, loaded: LoadedModel, prompt: str, previous: Optional[StoredResponse]) -> List[int]:
        """The prompt's tokens: when it begins with the text of the conversation it continues, that
        conversation's own tokens (as its session holds them) and the rest tokenized; else all of
        it tokenized (a template that writes an earlier reply differently from the model, say)."""
        if (previous is not None and previous.text is not None and previous.model == loaded.spec.key
                and prompt.startswith(previous.text)):
            return list(previous.token_ids) + await self.manager.tokenize(loaded, prompt[len(previous.text):],
                                                                          self.client)
        return await self.manager.tokenize(loaded, prompt, self.client)

    def keep(self, replies: ResponseReplies, loaded: LoadedModel, conversation: List[Dict[str, Any]], prompt: str,
             finished: "FinishedRun") -> None:
        """Stores the response for ``GET`` and for a request that continues it."""
        messages = tuple(conversation + [replies.assistant_message()])
        reply = replies.response.model_dump(mode="json")
        text = prompt + finished.output_text if finished.token_ids is not None else None
        kept = self.responses.put(StoredResponse.of(replies.response.id, self.client, loaded.spec.key, reply,
                                                    messages, finished.token_ids, text))
        if not kept:
            logger.info("[%s] Response %s not stored: larger than the store keeps", self.connection_id,
                        replies.response.id)

    async def send_typed_event(self, event: Dict[str, Any]) -> None:
        """Writes one server-sent event named by its type, and flushes it."""
        self.start_event_stream()
        self.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n")
        await self.flush()


@dataclass(frozen=True)
class FinishedRun:
    """What a response's generation left: the tokens its conversation now holds (None when the
    session's tokens are not known) and the reply's text as generated, stop text included."""

    token_ids: Optional[tuple]
    output_text: str


class ResponseRun:
    """One response's generation, answered whole or streamed by ``handler``."""

    def __init__(self, handler: ResponsesHandler, loaded: LoadedModel, request: GenerationRequest,
                 replies: ResponseReplies, prompt_tokens: int):
        self.handler = handler
        self.loaded = loaded
        self.request = request
        self.replies = replies
        self.prompt_tokens = prompt_tokens
        self.tokens = 0
        self.outputs: List[str] = []
        self.token_ids: Optional[tuple] = None

    async def updates(self):
        """The generation's updates; the last one also leaves the conversation's tokens here."""
        async with aclosing(self.handler.generate(self.loaded, self.request)) as updates:
            async for update in updates:
                self.tokens += update.token_count
                self.outputs.append(update.outputs)
                if update.last and update.finish_reason != "cancelled":
                    self.token_ids = tuple(self.handler.session.positions.conversation())
                yield update

    def usage(self) -> ResponseUsage:
        return ResponseUsage.of(self.prompt_tokens, self.tokens, self.handler.cached_tokens)

    def finished(self) -> FinishedRun:
        return FinishedRun(self.token_ids, "".join(self.outputs))

    async def whole(self) -> Optional[FinishedRun]:
        """Generates the whole reply, then answers the response (what a stream's events add up to);
        None when nobody is left to answer."""
        last = None
        async for last in self.updates():
            self.replies.push(last.text)
        if self.handler.client_left:
            return None
        self.replies.finished(last, self.usage())
        self.handler.write(self.replies.response.json_text())
        return self.finished()

    async def stream(self) -> Optional[FinishedRun]:
        """Streams the response's events. An error before anything is sent is a plain HTTP error;
        after, an ``error`` event ends the stream (and nothing is stored)."""
        send = self.handler.send_typed_event
        last: Optional[GenerationUpdate] = None
        try:
            async for last in self.updates():
                if self.replies.sequence_number == 0:
                    for event in self.replies.started():
                        await send(event)
                for event in self.replies.push(last.text):
                    await send(event)
            if self.handler.client_left:
                return None
            for event in self.replies.finished(last, self.usage()):
                await send(event)
            return self.finished()
        except tornado.iostream.StreamClosedError:
            return None
        except Exception as error:
            if not self.handler.event_stream_started:  # nothing sent yet: a plain HTTP error
                raise
            await send(self.replies.failed(self.handler.stream_error(error)))
            return None


class StoredResponseHandler(OpenAIHandler):
    """``GET /v1/responses/{id}`` (the response as it was answered) and ``DELETE`` (forgets it):
    a client sees only its own responses."""

    cors_methods = "GET, DELETE, OPTIONS"

    def stored(self, response_id: str) -> StoredResponse:
        stored = self.responses.get(response_id, self.client)
        if stored is None:
            raise UnknownResponse(f"No response with id {response_id!r}")
        return stored

    def options(self, response_id: str) -> None:
        super().options()

    def get(self, response_id: str) -> None:
        self.write(json.dumps(self.stored(response_id).reply))

    def delete(self, response_id: str) -> None:
        self.stored(response_id)
        self.responses.delete(response_id, self.client)
        self.write(json.dumps({"id": response_id, "object": "response.deleted", "deleted": True}))
