"""The ``/v1`` replies of a request for one choice or several (``n`` > 1, the rows of one session).

Each choice has a reply builder of its own (``CompletionReplies.as_choice``: the request's id, the
choice's index, its own streaming state), fed the updates of its row. A whole reply lists every
choice; its usage counts the prompt once and the tokens of every choice. A stream sends each
choice's chunks, with its index, as they come: each choice's first has the role, its last its
finish reason; then the usage, if asked.
"""

import json
from contextlib import aclosing
from typing import List, Optional, Sequence

import tornado.iostream

from handlers.openai_replies import CompletionReplies, Usage
from sessions.models import LoadedModel
from sessions.requests import ChosenTokenLogprobs, GenerationRequest, GenerationUpdate


class SeveralChoices:
    """Mixed into the ``/v1`` completion handlers (``CompletionHandler``, whose ``generate``,
    ``send_event``, ``stream_error`` and state it uses): the whole reply or the stream of a request,
    one choice (``n`` = 1) being the case of a single row."""

    async def several_choices_reply(self, loaded: LoadedModel, request: GenerationRequest,
                                    replies: Sequence[CompletionReplies], prompt_tokens: int,
                                    include_usage: bool) -> None:
        """Answers ``request``'s choices, each through its builder in ``replies`` (in order), as one
        whole reply or, for a stream, as events."""
        if self.streaming:
            await self.stream_choices(loaded, request, replies, prompt_tokens, include_usage)
        else:
            await self.whole_choices(loaded, request, replies, prompt_tokens)

    async def whole_choices(self, loaded: LoadedModel, request: GenerationRequest,
                            replies: Sequence[CompletionReplies], prompt_tokens: int) -> None:
        """Generates every choice, then answers them as one JSON object."""
        texts: List[List[str]] = [[] for _ in replies]
        logprobs: List[List[ChosenTokenLogprobs]] = [[] for _ in replies]
        lasts: List[Optional[GenerationUpdate]] = [None] * len(replies)
        tokens, route, prediction = 0, None, None
        async with aclosing(self.generate(loaded, request)) as updates:
            async for update in updates:
                texts[update.row].append(update.text)
                logprobs[update.row].extend(update.logprobs)
                tokens += update.token_count
                if update.last:
                    lasts[update.row], route = update, update.route or route
                    prediction = update.prediction_tokens or prediction  # drafts: one choice's only
        if self.client_left:  # maybe before anything was generated: nobody to answer
            return
        usage = Usage.of(prompt_tokens, tokens, self.cached_tokens, prediction)
        choices = [builder.whole_choice("".join(text), last, row_logprobs)
                   for builder, text, last, row_logprobs in zip(replies, texts, lasts, logprobs)]
        self.write(replies[0].reply_of(choices, usage, route).json_text())

    async def stream_choices(self, loaded: LoadedModel, request: GenerationRequest,
                             replies: Sequence[CompletionReplies], prompt_tokens: int, include_usage: bool) -> None:
        """Streams every choice's chunks as they come. An error before anything is sent (an event,
        or a place in line) is a plain HTTP error reply, so that clients see its status; after, an
        error event."""
        tokens, first, prediction = 0, [True] * len(replies), None
        pending: List[List[ChosenTokenLogprobs]] = [[] for _ in replies]  # of tokens whose text is held back
        try:
            async with aclosing(self.generate(loaded, request)) as updates:
                async for update in updates:
                    row = update.row
                    tokens += update.token_count
                    prediction = update.prediction_tokens or prediction
                    pending[row].extend(update.logprobs)
                    if update.text or first[row] or update.last:
                        await self.send_event(replies[row].chunk(update, first[row], pending[row]).json_text())
                        pending[row], first[row] = [], False
            if self.client_left:
                return
            if include_usage:
                await self.send_event(replies[0].usage_chunk(
                    Usage.of(prompt_tokens, tokens, self.cached_tokens, prediction)).json_text())
        except tornado.iostream.StreamClosedError:
            return
        except Exception as error:
            if not self.event_stream_started:
                raise
            await self.send_event(json.dumps(self.stream_error(error)))
        await self.send_event("[DONE]")
