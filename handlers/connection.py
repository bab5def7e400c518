"""One WebSocket client of ``/api/v2/generate``: its session, its generation tasks, its replies.

The Tornado handler only accepts the socket and forwards frames here. Each ``generate`` runs
as a task of its own (so a ``stop`` or a disconnect is read while tokens flow); the session
runs them one at a time in the order they came. Every error becomes an error reply.

A session opened with ``"resumable": true`` outlives a connection that drops (one the client
closes normally, with code 1000, ends it as usual): its generations go on,
their replies are kept (``handlers.replies``), and a new connection that brings the session's
id and resume token continues it where the client stopped reading.
"""

import asyncio
import json
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Optional, Union

from handlers.protocol import GenerateMessage, OpenSessionMessage, ResumeSessionMessage, StopMessage, parse_message
from handlers.replies import ReplyChannel
from sessions import request_rules
from sessions.errors import SessionStateError, TooManyConnections, error_payload, log_error
from sessions.observe.logs import ConnectionLog
from sessions.requests import GenerationRequest, GenerationUpdate
from sessions.serving.admission import Slot
from sessions.serving.manager import SessionManager
from sessions.serving.session import ChatSession

logger = logging.getLogger(__name__)

OK_REPLY = json.dumps({"ok": True})


def update_reply(update: GenerationUpdate, visible_text: bool = False) -> Dict[str, Any]:
    """One generation reply as the wire has it (``text`` and ``route`` only when the client asked)."""
    body: Dict[str, Any] = {"ok": True, "outputs": update.outputs, "stop": update.stop,
                            "token_count": update.token_count}
    if visible_text:
        body["text"] = update.text
    if update.route is not None:
        body["route"] = update.route
    if update.session_length is not None:
        body["session_length"] = update.session_length
    return body


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
        try:
            message = parse_message(raw, self.max_message_bytes)
            if isinstance(message, OpenSessionMessage):
                await self._open_session(message)
            elif isinstance(message, ResumeSessionMessage):
                await self._resume_session(message)
            elif isinstance(message, GenerateMessage):
                self._start_generation(message.request)
            elif isinstance(message, StopMessage):
                await self._stop()
        except Exception as error:
            await self.send_error(log_error(self.log, "Rejected a message", error))

    async def _open_session(self, message: OpenSessionMessage) -> None:
        self._check_no_session()
        session = await self.manager.open_session(self.connection_id, message.model, message.max_length,
                                                  self.client, trusted=self.trusted)
        if self.closed:  # the client left while the session was opening
            self.manager.close_in_background(session, "connection closed")
            return
        self.session = session
        if not message.resumable:
            self.replies = ReplyChannel(self._send, owner=self)
            await self._send(OK_REPLY)
            return
        self.replies = ReplyChannel(self._send, owner=self, numbered=True, on_full=session.request_stop)
        token = self.manager.make_resumable(session, self.replies)
        await self._send(json.dumps({"ok": True, "session_id": session.session_id, "resume_token": token}))

    async def _resume_session(self, message: ResumeSessionMessage) -> None:
        self._check_no_session()
        session, replies = self.manager.resume(message.session_id, message.resume_token,
                                               lambda replies: replies.check_replayable(message.last_seq))
        try:
            # Taken over before anything is awaited: a late close of the old connection finds it
            # no longer holds the session, so it neither detaches nor closes it.
            previous = replies.owner
            replies.take(self)
            self.session, self.replies = session, replies
            if previous is not None and previous is not self:
                previous.let_go(session)  # its connection has not noticed it is gone
            await self._send(json.dumps({"ok": True, "session_id": session.session_id, "resumed": True,
                                         "latest_seq": replies.seq}))
            await replies.attach(self._send, message.last_seq)
        finally:
            self.manager.resumed(session)
        self.log.info("Resumed session %s after reply %d", session.session_id, message.last_seq)

    def _check_no_session(self) -> None:
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

    def _start_generation(self, request: GenerationRequest) -> None:
        if not self.holds_session:
            raise SessionStateError("Open an inference session first (type: open_inference_session)")
        request_rules.check_request(self.session.model.spec, request)
        self.manager.admission.check_waiting(self.session.unfinished_generations)
        updates = self.session.generate(request)  # takes its place in line now
        self.manager.spawn(self._stream(updates, request.visible_text, self.replies), f"generate-{self.connection_id}")

    async def _stream(self, updates: AsyncIterator[GenerationUpdate], visible_text: bool,
                      replies: ReplyChannel) -> None:
        # Replies go to the session's channel, which a resuming connection may take over meanwhile.
        try:
            async with aclosing(updates):
                async for update in updates:
                    await replies.deliver(update_reply(update, visible_text))
        except Exception as error:
            await self.send_error(log_error(self.log, "Generation failed", error), replies)

    async def _stop(self) -> None:
        if self.holds_session and self.session.has_generations:
            self.session.request_stop()
            self.log.info("Stop requested")
        else:
            await self.replies.deliver(update_reply(GenerationUpdate(outputs="", stop=True, token_count=0)))

    async def send_error(self, error: BaseException, replies: Optional[ReplyChannel] = None) -> None:
        """Writes an error reply (to the session's channel, or ``replies``) and counts it."""
        payload = error_payload(error, debug=self.debug)
        self.manager.metrics.count_error(payload["code"])
        await (replies or self.replies).deliver(payload)

    def close(self, by_client: bool = False) -> None:
        """The socket closed: the session and its generations end in the background. A resumable
        session whose connection dropped (not closed ``by_client`` on purpose) waits for its
        client to come back instead."""
        self.closed = True
        if self._slot is not None:
            self._slot.release()
        if not self.holds_session:
            return
        if self.replies.numbered and not by_client and not self.session.released:
            self.replies.detach()
            self.manager.detach(self.session)
        else:
            self.manager.close_in_background(self.session, "connection closed")
