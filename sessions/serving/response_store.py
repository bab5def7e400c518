"""Stored responses: what ``/v1/responses`` keeps of a response for ``GET``, ``DELETE`` and a later
request that continues it (``previous_response_id``).

A stored response holds its reply as sent (JSON-ready), the conversation it ends (the messages a
continuation is rendered from) and that conversation as the model's tokens with the text they
stand for, so that the next turn's prompt can begin with exactly the tokens its session already
holds. Only its owner (the client that made it: a key, or an address) sees it; anyone else is
told there is no such response. The store is bounded by count, in all and per owner, by the
characters it holds and by age; the oldest go first. It lives in memory: a restart forgets it.
"""

import array
import collections
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from config import StoreLimits

# What one stored response may weigh, at most, relative to the store's budget of bytes:
# a response larger than this is not kept (its owner is told at once when it asks for it).
MAX_SHARE_OF_STORE = 0.25


@dataclass(frozen=True)
class StoredResponse:
    """One response as kept: its ``reply`` (the response object, as a JSON-ready dict), the
    conversation's ``messages`` up to and including the reply, and the session's ``token_ids``
    with the prompt ``text`` they stand for (None when they could not be told apart)."""

    response_id: str
    owner: str
    model: str
    reply: Dict[str, Any]
    messages: Tuple[Dict[str, Any], ...]
    token_ids: Optional[array.array]
    text: Optional[str]
    size: int  # what it weighs in the store, in bytes: its texts and tokens

    @classmethod
    def of(cls, response_id: str, owner: str, model: str, reply: Dict[str, Any], messages: Sequence[Dict[str, Any]],
           token_ids: Optional[Sequence[int]], text: Optional[str]) -> "StoredResponse":
        """A response to keep, weighed (its tokens kept as 4-byte integers)."""
        tokens = array.array("i", token_ids) if token_ids is not None else None
        size = (len(json.dumps(reply)) + len(json.dumps(messages)) + len(text or "")
                + (tokens.itemsize * len(tokens) if tokens is not None else 0))
        return cls(response_id, owner, model, reply, tuple(messages), tokens, text, size)


class ResponseStore:
    """Responses by id, oldest first, within ``limits``."""

    def __init__(self, limits: StoreLimits = StoreLimits(), clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._responses: "collections.OrderedDict[str, Tuple[StoredResponse, float]]" = collections.OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._responses)

    @property
    def enabled(self) -> bool:
        """Whether responses are kept at all."""
        return self.limits.max_responses > 0

    def put(self, response: StoredResponse) -> bool:
        """Keeps ``response``, letting the oldest go while over the limits; False when it is not kept
        (the store is off, or the response alone weighs too much)."""
        if not self.enabled or response.size > self.limits.max_bytes * MAX_SHARE_OF_STORE:
            return False
        self._expire()
        self._responses[response.response_id] = (response, self._clock())
        self._bytes += response.size
        owned = [key for key, (kept, _) in self._responses.items() if kept.owner == response.owner]
        for key in owned[:max(0, len(owned) - self.limits.max_per_owner)]:  # an owner past its share: its own first
            self._pop(key)
        while len(self._responses) > self.limits.max_responses or self._bytes > self.limits.max_bytes:
            self._pop(next(iter(self._responses)))
        return True

    def get(self, response_id: str, owner: str) -> Optional[StoredResponse]:
        """The response ``response_id`` if ``owner`` made it and it is still kept."""
        self._expire()
        kept = self._responses.get(response_id)
        return kept[0] if kept is not None and kept[0].owner == owner else None

    def delete(self, response_id: str, owner: str) -> bool:
        """Forgets the response ``response_id`` of ``owner``; False if there is none."""
        if self.get(response_id, owner) is None:
            return False
        self._pop(response_id)
        return True

    def _expire(self) -> None:
        now = self._clock()
        while self._responses:
            key, (_, stored_at) = next(iter(self._responses.items()))
            if now - stored_at <= self.limits.max_age:
                break
            self._pop(key)

    def _pop(self, key: str) -> None:
        response, _ = self._responses.pop(key)
        self._bytes -= response.size
