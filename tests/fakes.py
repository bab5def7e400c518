"""Stand-ins for a model and its token stream, for unit tests of the session logic only.

Every feature is proven on the real swarm elsewhere; these let the tests see tickets, stops,
queueing, reaping and teardown without one. Text is one token per character (the id is the
code point), and id 0 is the end of sequence.
"""

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from config import ChatSettings, FrontendSettings, ModelSpec, Settings
from sessions.engine.executor import BlockingExecutor
from sessions.engine.speculation import Draft
from sessions.observe.metrics import SessionMetrics
from sessions.observe.swarm_state import SwarmMonitor
from sessions.serving.admission import Admission
from sessions.serving.manager import SessionManager
from swarm.route_trace import RouteRecorder

EOS = 0


class CharTokenizer:
    """One token per character."""

    eos_token_id = EOS
    eos_token = "\0"

    def decode(self, ids: Sequence[int], **options) -> str:
        return "".join(chr(token) for token in ids)


@dataclass
class FakeModel:
    """What a session needs of a loaded model."""

    spec: ModelSpec = field(default_factory=lambda: ModelSpec(
        repository="fake/model", family="Fake", frontend=FrontendSettings(name="Fake"),
        chat=ChatSettings(max_session_length=256)))
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)

    max_token_chars = 1
    state_bytes_per_token = 4

    @property
    def eos_token_id(self) -> int:
        return EOS

    def encode(self, text: str) -> List[int]:
        return [ord(char) for char in text]


class FakeTokenStream:
    """Answers each step with the next character of ``reply`` (then EOS), after ``step_seconds``;
    a step given a draft keeps the draft's characters that ``reply`` has next, as a greedy model would.

    ``hold`` blocks every step until it is set, so a test can keep a step in flight;
    ``hold_close`` does the same for ``close``.
    """

    def __init__(self, reply: str = "hello world", step_seconds: float = 0.0):
        self.reply = reply
        self.step_seconds = step_seconds
        self.position = 0
        self.pending: Optional[int] = None
        self.fed: List[int] = []
        self.steps_running = 0
        self.closed_while_stepping = False
        self.closed = False
        self.hold = threading.Event()
        self.hold.set()
        self.hold_close = threading.Event()  # blocks ``close`` until set, like a hung swarm server
        self.hold_close.set()
        self._next = 0
        self.span_count = 1
        self.route = RouteRecorder()
        self.drafts: List[tuple] = []  # the drafts steps verified
        self.last_logprobs: List[None] = []

    def step(self, new_input_ids: Sequence[int] = (), sampling=None, speculation=None) -> List[int]:
        self.steps_running += 1
        try:
            self.hold.wait()
            time.sleep(self.step_seconds)
            feed = ([self.pending] if self.pending is not None else []) + list(new_input_ids)
            draft = Draft()
            if speculation is not None and self.pending is not None:
                draft = speculation.propose(self.fed + feed, len(new_input_ids))
                self.drafts.append(draft.tokens)
            self.fed.extend(feed)
            self.position += len(feed)
            chosen = []
            for guess in (*draft.tokens, None):
                chosen.append(ord(self.reply[self._next]) if self._next < len(self.reply) else EOS)
                self._next += 1
                if chosen[-1] != guess:
                    break
            if draft.tokens:
                speculation.observe(draft, len(chosen) - 1)
            self.fed.extend(chosen[:-1])
            self.position += len(chosen) - 1
            self.pending = chosen[-1]
            self.last_logprobs = [None] * len(chosen)
            return chosen
        finally:
            self.steps_running -= 1

    def replace_pending(self, token_id: int) -> None:
        self.pending = token_id

    def discard_pending(self) -> None:
        if self.pending is not None:
            self.pending = None
            self._next -= 1  # as with a greedy model, the same token comes next again

    def truncate(self, length: int) -> None:
        conversation = self.fed + ([self.pending] if self.pending is not None else [])
        self._next -= len(conversation) - length  # the reply's tokens cut come again, as with a greedy model
        self.fed, self.pending = conversation[:length - 1], conversation[length - 1]
        self.position = length - 1

    def close(self) -> None:
        self.closed_while_stepping = self.steps_running > 0
        self.hold_close.wait()
        self.closed = True


class FakeRegistry:
    """Finds the one fake model by any name."""

    def __init__(self, model: FakeModel):
        self.model = model

    @property
    def models(self) -> List[FakeModel]:
        return [self.model]

    async def load(self) -> None:
        pass

    def find(self, name: object, trusted: bool = True) -> FakeModel:
        return self.model

    async def close(self) -> None:
        pass


def fake_manager(executor: BlockingExecutor, settings: Settings = Settings(),
                 open_stream: Optional[Callable[[FakeModel, int], FakeTokenStream]] = None) -> SessionManager:
    """A session manager over the fake model, its sessions on ``open_stream``'s fake streams
    (by default each says "hello world"); ``start`` it before use."""
    admission = Admission(settings)
    metrics = SessionMetrics(open_sessions=lambda: admission.open_sessions, executor_queue_depth=lambda: 0,
                             reserved_state_bytes=lambda: admission.reserved_bytes,
                             state_budget_bytes=admission.memory_budget)
    registry = FakeRegistry(FakeModel())
    return SessionManager(registry, admission, executor, SwarmMonitor(registry), metrics, settings,
                          open_stream=open_stream or (lambda model, max_length: FakeTokenStream()))
