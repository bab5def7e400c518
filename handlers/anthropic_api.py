"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A request (``handlers.anthropic_protocol``) is said again as the chat completion it amounts to,
and runs as ``/v1/chat/completions`` runs one: the same prompt rendering, tool grammar, limits,
line and warm sessions (``ChatCompletionHandler``). Only the replies differ: Anthropic's message
or its stream of named events (``handlers.anthropic_replies``), and errors in Anthropic's shape.
"""

import json
from contextlib import aclosing
from typing import Iterable, Tuple, Type

import tornado.iostream

from handlers.anthropic_protocol import CountTokensRequest, MessagesRequest
from handlers.anthropic_replies import MessageReplies
from handlers.openai_api import ChatCompletionHandler
from handlers.openai_protocol import ChatCompletionRequest
from sessions import request_rules
from sessions.models import LoadedModel
from sessions.requests import GenerationRequest, SamplingParams


class MessagesHandler(ChatCompletionHandler):
    """``POST /v1/messages``: a conversation answered as Anthropic's message, or its events."""

    api = "anthropic"
    connection_prefix = "anthropic-"
    anthropic_request: Type[CountTokensRequest] = MessagesRequest
    prefill = ""  # the beginning of the reply the request gave (a last assistant message)

    def parse_body(self) -> ChatCompletionRequest:
        request = self.anthropic_request.parse(self.json_body())
        self.prefill = request.prefill
        return request.chat_request()

    async def prompt(self, body: ChatCompletionRequest, loaded: LoadedModel,
                     sampling: SamplingParams) -> Tuple[str, Tuple[str, ...]]:
        """The chat completion's prompt, then the beginning of the reply, which the model continues."""
        prompt, format_stops = await super().prompt(body, loaded, sampling)
        return prompt + self.prefill, format_stops

    def replies_for(self, body: ChatCompletionRequest, loaded: LoadedModel, prompt: str) -> MessageReplies:
        return MessageReplies(loaded.spec.key, loaded.tool_syntax if body.callable_tools() else None,
                              body.stop_strings)

    async def full_reply(self, loaded: LoadedModel, request: GenerationRequest, replies: MessageReplies,
                         prompt_tokens: int) -> None:
        async with aclosing(self.generate(loaded, request)) as updates:
            async for update in updates:
                replies.events(update, prompt_tokens, self.cached_tokens)
        if self.client_left:  # maybe before anything was generated: nobody to answer
            return
        self.write(replies.message().json_text())

    async def stream_reply(self, loaded: LoadedModel, request: GenerationRequest, replies: MessageReplies,
                           prompt_tokens: int, include_usage: bool) -> None:
        """Streams the reply as Anthropic's events. An error before anything is sent (an event, or
        a place in line) is a plain HTTP error reply, so that clients see its status; after, an
        ``error`` event."""
        try:
            async with aclosing(self.generate(loaded, request)) as updates:
                async for update in updates:
                    events = replies.events(update, prompt_tokens, self.cached_tokens)
                    await self.send_events((event.type, event.json_text()) for event in events)
        except tornado.iostream.StreamClosedError:
            return
        except Exception as error:
            if not self.event_stream_started:  # nothing sent yet: a plain HTTP error
                raise
            await self.send_events([("error", json.dumps(self.stream_error(error)))])

    async def send_events(self, events: Iterable[Tuple[str, str]]) -> None:
        """Writes server-sent events, each named (its ``type``) with its JSON text, and flushes them."""
        self.start_event_stream()
        for name, data in events:
            self.write(f"event: {name}\ndata: {data}\n\n")
        await self.flush()


class CountTokensHandler(MessagesHandler):
    """``POST /v1/messages/count_tokens``: the tokens the prompt of a request would be, counted
    as ``/v1/messages`` counts its ``input_tokens`` (rendered and tokenized in the tokenizer's
    threads); no session is opened."""

    anthropic_request = CountTokensRequest

    async def post(self) -> None:
        body = self.parse_body()
        loaded = self.manager.find_model(body.model, self.client, trusted=False)
        prompt, _ = await self.prompt(body, loaded, body.sampling_params(loaded.tool_syntax))
        request_rules.check_text_length(prompt, loaded.spec.chat.max_session_length, loaded.max_token_chars)
        tokens = await self.manager.tokenizer_pool.run(self.client, loaded.encode, prompt)
        self.write({"input_tokens": len(tokens)})
