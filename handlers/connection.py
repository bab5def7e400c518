"""One WebSocket client of ``/api/v2/generate``: its session, its generation tasks, its replies.

The Tornado handler only accepts the socket and forwards frames here. Each ``generate`` runs
as a task of its own (so a ``stop`` or a disconnect is read while tokens flow); the session
runs them one at a time in the order they came. Every error becomes an error reply.

Every reply is built by ``handlers.native_replies`` and echoes the ``id`` of the request it
answers, when the request has one.

A session opened with ``"resumable": true`` outlives a connection that drops (one the client
closes normally, with code 1000, ends it as usual): its generations go on,
their replies are kept (``handlers.replies``), and a new connection that brings the session's
id and resume token continues it where the client stopped reading.
"""

import asyncio
import logging
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable, Optional, Union

from handlers.native_replies import (
    Done,
    ErrorReply,
    Queued,
    RequestId,
    SessionOpened,
    SessionResumed,
    StreamedReply,
    cancelled_with_nothing_running,
)
from handlers.protocol import (
    CancelMessage,
    GenerateMessage,
    OpenSessionMessage,
    ResumeSessionMessage,
    decode_frame,
    parse_message,
    request_id,
)
from handlers.replies import ReplyChannel
from sessions import request_rules
from sessions.errors import SessionStateError, TooManyConnections, classify, log_error
from sessions.observe.logs import ConnectionLog
from sessions.requests import GenerationRequest, GenerationUpdate
from sessions.serving.admission import Slot
from sessions.serving.manager import SessionManager
from sessions.serving.session import ChatSession

logger = logging.getLogger(__name__)


class GenerateConnection:
    """The state of one WebSocket connection; ``send`` writes a text frame (and drops it once closed).

    ``trusted`` says whether the peer is this server's own chat page (which may use models
    that are not public).
    """

    def __init__(self, connection_id: str, manager: SessionManager, send: Callable[[str], Awaitable[None]],
                 client: str, trusted: bool, max_message_bytes: int, debug: bool = False):
        self.connection_id = connection_id
        self.manager = manager
        self.client = client
        self.trusted = trusted
        self.max_message_bytes = max_message_bytes
        self.debug = debug
        self.log = ConnectionLog(logger, connection_id)
        self.session: Optional[ChatSession] = None
        self.closed = False
        self._send = send
        self.replies = ReplyChannel(send, owner=self)  # the session's, once a resumable one is opened or resumed
        self._slot: Optional[Slot] = None
        self._opening: Optional[asyncio.Future] = None  # a session being opened (maybe waiting for room)
        self._rate = manager.admission.message_rate()
        self._received = manager.admission.received_bytes(client)

    async def admit(self) -> bool:
        """Takes the connection's place within the limits; False (after an error reply) if it has none."""
        try:
            self._slot = self.manager.admission.admit_connection(self.client)
        except TooManyConnections as error:
            await self.send_error(log_error(self.log, "Refused the connection", error))
            return False
        return True

    async def on_message(self, raw: Union[str, bytes]) -> None:
        """Handles one frame; answers errors with an error reply. A frame over the connection's
        message rate or its client's bytes per second waits until the budget allows it: the
        socket is not read meanwhile (Tornado reads the next frame once this returns), so a
        flood is slowed to the rate instead of being read, parsed and answered."""
        wait = max(self._rate.delay(), self._received.delay(len(raw)))
        if wait:
            await asyncio.sleep(wait)
            if self.closed:
                return
        answering: RequestId = None
        try:
            data = decode_frame(raw, self.max_message_bytes)
            answering = request_id(data)
            message = parse_message(data)
            if not isinstance(message, CancelMessage):
                await self._opened()
            if isinstance(message, OpenSessionMessage):
                self._check_no_session()
                self._opening = self.manager.spawn(self._open_session(message, answering),
                                                   f"open-{self.connection_id}")
            elif isinstance(message, ResumeSessionMessage):
                await self._resume_session(message, answering)
            elif isinstance(message, GenerateMessage):
                self._start_generation(message.request, answering)
            elif isinstance(message, CancelMessage):
                await self._cancel(answering)
        except Exception as error:
            await self.send_error(log_error(self.log, "Rejected a message", error), answering)

    async def _opened(self) -> None:
        """Waits for a session being opened: a client may send its next message before the open's
        reply (the open's own task answers it, an error included)."""
        if self._opening is not None:
            await asyncio.wait([self._opening])

    async def _open_session(self, message: OpenSessionMessage, answering: RequestId) -> None:
        # A task of its own, which a close cancels: on a full server it waits in line, and the
        # socket is read meanwhile (a close is noticed, and takes it out of the line).
        def queued(position: int) -> None:
            self.manager.spawn(self._send(Queued(True, position, id=answering).frame()), f"queued-{self.connection_id}")

        try:
            session = await self.manager.open_session(self.connection_id, message.model, message.max_length,
                                                      self.client, trusted=self.trusted,
                                                      on_queued=queued if message.queue_updates else None)
        except asyncio.CancelledError:  # the connection closed
            return
        except Exception as error:
            await self.send_error(log_error(self.log, "Rejected a message", error), answering)
            return
        finally:
            self._opening = None
        if self.closed:  # the client left while the session was opening
            self.manager.close_in_background(session, "connection closed")
            return
        self.session = session
        if not message.resumable:
            self.replies = ReplyChannel(self._send, owner=self)
            await self._send(Done(id=answering).frame())
            return
        self.replies = ReplyChannel(self._send, owner=self, numbered=True, on_full=session.cancel_generations)
        token = self.manager.make_resumable(session, self.replies)
        await self._send(SessionOpened(session.session_id, token, id=answering).frame())

    async def _resume_session(self, message: ResumeSessionMessage, answering: RequestId) -> None:
        self._check_no_session()
        session, replies = self.manager.resume(message.session_id, message.resume_token,
                                               lambda replies: replies.check_replayable(message.last_seq))
        try:
            # Taken over before anything is awaited: a late close of the old connection finds it
            # no longer holds the session, so it neither detaches nor closes it.
            previous = replies.owner
            replies.take(self)
            self.session, self.replies = session, replies
            session.serve(self.connection_id)
            if previous is not None and previous is not self:
                previous.let_go(session)  # its connection has not noticed it is gone
            await self._send(SessionResumed(session.session_id, True, replies.seq, id=answering).frame())
            await replies.attach(self._send, message.last_seq)
        finally:
            self.manager.resumed(session)
        self.log.info("Resumed session %s after reply %d", session.session_id, message.last_seq)

    def _check_no_session(self) -> None:
        if self._opening is not None:
            raise SessionStateError("An inference session is already being opened on this connection")
        if self.holds_session and not self.session.released:
            raise SessionStateError("An inference session is already open on this connection")

    @property
    def holds_session(self) -> bool:
        """Whether this connection still speaks for its session (a resumed one moves to the new connection)."""
        return self.session is not None and self.replies.owner is self

    def let_go(self, session: ChatSession) -> None:
        """Another connection resumed ``session``: this one no longer speaks for it."""
        if self.session is session:
            self.session = None
            self.replies = ReplyChannel(self._send, owner=self)
            self.log.info("Session %s was resumed on another connection", session.session_id)

    def _start_generation(self, request: GenerationRequest, answering: RequestId) -> None:
        if not self.holds_session:
            raise SessionStateError("Open an inference session first (type: open_inference_session)")
        request_rules.check_request(self.session.model.spec, request)
        self.manager.admission.check_waiting(self.session.unfinished_generations)
        self.session.account.take_request()
        updates = self.session.generate(request)  # takes its place in line now
        self.manager.spawn(self._stream(updates, request.visible_text, self.replies, answering),
                           f"generate-{self.connection_id}")

    async def _stream(self, updates: AsyncIterator[GenerationUpdate], visible_text: bool,
                      replies: ReplyChannel, answering: RequestId) -> None:
        # Replies go to the session's channel, which a resuming connection may take over meanwhile.
        try:
            async with aclosing(updates):
                async for update in updates:
                    await replies.deliver(StreamedReply.of(update, visible_text, answering))
        except Exception as error:
            await self.send_error(log_error(self.log, "Generation failed", error), answering, replies)

    async def _cancel(self, answering: RequestId) -> None:
        if self.holds_session and self.session.has_generations:
            self.session.cancel_generations()  # the running generation's last reply answers it
            self.log.info("Stop requested")
        else:
            await self.replies.deliver(cancelled_with_nothing_running(answering))

    async def send_error(self, error: BaseException, answering: RequestId = None,
                         replies: Optional[ReplyChannel] = None) -> None:
        """Writes an error reply to the request ``answering`` (to the session's channel, or
        ``replies``) and counts it."""
        self.manager.metrics.count_error(classify(error).code)
        await (replies or self.replies).deliver(ErrorReply(error, self.debug, answering))

    def close(self, by_client: bool = False) -> None:
        """The socket closed: the session and its generations end in the background. A resumable
        session whose connection dropped (not closed ``by_client`` on purpose) waits for its
        client to come back instead."""
        self.closed = True
        if self._slot is not None:
            self._slot.release()
        if self._opening is not None:
            self._opening.cancel()
        if not self.holds_session:
            return
        if self.replies.numbered and not by_client and not self.session.released:
            self.replies.detach()
            self.manager.detach(self.session)
        else:
            self.manager.close_in_background(self.session, "connection closed")
