"""Where a WebSocket session's replies go on their way to its client.

Replies of an ordinary session go straight to the socket. Those of a resumable session are
numbered (``seq``) and the latest are kept, so that a client that reconnects gets, in order,
each reply it missed, and nothing twice.
"""

import collections
import json
from typing import Any, Awaitable, Callable, Deque, Optional, Tuple, Union

from handlers.native_replies import ErrorReply, NativeReply
from sessions.errors import ResumeRefused

# Replies a resumable session keeps for a client that comes back; while no connection holds the
# session, its generations are stopped before the buffer is full (the last replies still fit).
KEPT_REPLIES = 512
KEPT_AFTER_STOP = 16

Send = Callable[[str], Awaitable[None]]


class ReplyChannel:
    """The replies of one session: sent through ``send`` while a connection holds it.

    A ``numbered`` channel keeps its latest replies; ``detach`` holds them back until a new
    connection ``take``s the channel and ``attach`` sends it the missed ones. ``on_full`` runs
    (once per detachment) when the replies kept since the connection dropped near the buffer's
    size, with no connection to take them.
    """

    def __init__(self, send: Optional[Send], owner: Any = None, numbered: bool = False,
                 on_full: Callable[[], None] = lambda: None):
        self.owner = owner  # the connection that holds the session
        self.numbered = numbered
        self.seq = 0  # the number of the latest reply
        self._send = send
        self._kept: Deque[Tuple[int, str]] = collections.deque(maxlen=KEPT_REPLIES if numbered else 0)
        self._on_full = on_full
        self._kept_while_detached = 0  # replies kept since the connection dropped
        self._stopped_while_detached = False

    async def deliver(self, reply: Union[NativeReply, ErrorReply]) -> None:
        """Sends one reply (numbered and kept, on a numbered channel)."""
        if self.numbered:
            self.seq += 1
            body = reply.body()
            body["seq"] = self.seq
            frame = json.dumps(body)
            self._kept.append((self.seq, frame))
            if self._send is None and self.owner is None:
                self._kept_while_detached += 1
                if not self._stopped_while_detached and self._kept_while_detached >= KEPT_REPLIES - KEPT_AFTER_STOP:
                    self._stopped_while_detached = True
                    self._on_full()
        else:
            frame = reply.frame()
        if self._send is not None:
            await self._send(frame)

    def detach(self) -> None:
        """The connection dropped: replies are kept until one attaches."""
        self._send, self.owner = None, None
        self._kept_while_detached = 0
        self._stopped_while_detached = False

    def check_replayable(self, last_seq: int) -> None:
        """Raises ``ResumeRefused`` unless every reply after ``last_seq`` is still kept."""
        if last_seq > self.seq or (last_seq < self.seq and (not self._kept or self._kept[0][0] > last_seq + 1)):
            raise ResumeRefused(f"Replies after {last_seq} are no longer kept (the latest is {self.seq}); "
                                "open a new session")

    def take(self, owner: Any) -> None:
        """A new connection holds the channel from now on; replies are kept for it until ``attach``
        (a connection that still held it gets nothing more)."""
        self._send, self.owner = None, owner

    async def attach(self, send: Send, last_seq: int) -> None:
        """Sends the replies after ``last_seq`` in order (``check_replayable`` first) to the
        connection that took the channel, then every later one."""
        sent = last_seq
        while True:  # replies that come while the missed ones are sent queue behind them
            missed = [(seq, frame) for seq, frame in self._kept if seq > sent]
            if not missed:
                break
            for seq, frame in missed:
                await send(frame)
                sent = seq
        self._send = send
