"""Stand-ins for a model and its token stream, for unit tests of the session logic and for the
fast tier's tests of the APIs' shape (``FakeServer``: the real app on a real manager over fakes).

Every feature is proven on the real swarm elsewhere; these let the tests see tickets, stops,
queueing, reaping, teardown and the protocols' replies without one. Text is one token per
character (the id is the code point), and id 0 is the end of sequence.
"""

import functools
import json
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import tornado.httpclient
import tornado.httpserver
import tornado.testing

from config import Settings
from model_specs import ChatSettings, FrontendSettings, ModelSpec
from sessions.accounts.book import AccountBook
from sessions.engine.executor import BlockingExecutor
from sessions.engine.row_stream import row_seed
from sessions.engine.speculation import Draft
from sessions.formats.chat_format import ChatFormat
from sessions.formats.chat_template import ChatTemplate
from sessions.formats.tool_syntax import SERVER
from sessions.observe.metrics import SessionMetrics
from sessions.observe.swarm_state import SwarmMonitor
from sessions.serving import registry as registry_module
from sessions.serving.admission import Admission
from sessions.serving.manager import SessionManager
from sessions.serving.registry import ModelRegistry
from swarm.route_trace import RouteRecorder
from tests.ws_client import WSClient

EOS = 0
# A ChatML template, as SmolLM2's and Qwen's tokenizers carry (without their default system text).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


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

    template: Optional[str] = None  # the tokenizer's chat template (None: the declared "Role: text" format)

    max_token_chars = 1
    state_bytes_per_token = 4
    num_blocks = 2

    @property
    def eos_token_id(self) -> int:
        return EOS

    def encode(self, text: str) -> List[int]:
        return [ord(char) for char in text]

    @property
    def stop_token(self) -> str:
        return self.spec.chat.stop_token or self.tokenizer.eos_token

    @functools.cached_property
    def chat_format(self) -> ChatFormat:
        """Derived from ``template`` as a real model's is from its tokenizer's."""
        template = ChatTemplate(self.template, {"eos_token": self.tokenizer.eos_token}) if self.template else None
        return ChatFormat.for_template(template, self.spec.chat, self.stop_token, self.spec.key)

    # No template that describes tools: calls would be written in the server's own syntax, under a
    # grammar that needs a real tokenizer (tools are tested on the swarm).
    tool_template = None
    tool_syntax = SERVER

    def close(self) -> None:
        pass


def chat_model(repository: str = "fake/chat", **changes) -> FakeModel:
    """A fake model with a ChatML chat template, declared as the server declares a model
    (``changes``: other ``ModelSpec`` fields, such as ``aliases`` or ``public_api``)."""
    chat = ChatSettings(max_session_length=256, stop_token="<|im_end|>")
    spec = ModelSpec(repository=repository, family="Fake", frontend=FrontendSettings(name=repository), chat=chat)
    return FakeModel(spec=replace(spec, **changes), template=CHATML)


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

    def fed_token_ids(self) -> List[int]:
        return list(self.fed)

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


class FakeRowsStream:
    """A session of several rows (``sessions.engine.row_stream``): row ``i`` answers ``replies[i]``
    (cycling through them) one character per token, then EOS; ``fed`` has what each row was fed,
    ``seeds`` each row's seed. A row given no chooser (finished) chooses nothing. Each step takes
    ``step_seconds``."""

    def __init__(self, replies: Sequence[str], rows: int, step_seconds: float = 0.0):
        self.rows = rows
        self.step_seconds = step_seconds
        self.replies = [replies[row % len(replies)] for row in range(rows)]
        self.fed: List[List[int]] = [[] for _ in range(rows)]
        self.seeds: List[Optional[int]] = []
        self.position = 0
        self.span_count = 1
        self.route = RouteRecorder()
        self.closed = False
        self._last: List[Optional[int]] = [None] * rows
        self._next = [0] * rows

    async def choosers(self, sampling) -> list:
        self.seeds = [row_seed(sampling.seed, row) for row in range(self.rows)]
        return [replace(sampling, seed=seed) for seed in self.seeds]  # stand-ins: the replies are set

    def step(self, new_input_ids: Sequence[int], choosers: Sequence[Any]) -> list:
        time.sleep(self.step_seconds)
        feed = [([last] if last is not None else []) + list(new_input_ids) for last in self._last]
        for row, tokens in enumerate(feed):
            self.fed[row].extend(tokens)
        self.position += len(feed[0])
        chosen = []
        for row, chooser in enumerate(choosers):
            if chooser is None:
                chosen.append(None)
                continue
            reply, index = self.replies[row], self._next[row]
            self._next[row] += 1
            self._last[row] = ord(reply[index]) if index < len(reply) else EOS
            chosen.append((self._last[row], None))
        return chosen

    def close(self) -> None:
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


class _FakeLoader:
    """Stands in for the executor a ``ModelRegistry`` loads and closes its models in: "loading" a
    spec hands back its fake model."""

    def __init__(self, models: Sequence[FakeModel]):
        self.models = {model.spec.key: model for model in models}

    async def run(self, function: Callable, *args: Any) -> Any:
        if function is registry_module.load_model:
            return self.models[args[0].key]
        return function(*args)


def fake_registry(models: Sequence[FakeModel], refusals: Optional[Dict[str, str]] = None) -> ModelRegistry:
    """The server's own registry (names, aliases, public and refused models, as served) over fake
    models; ``refusals``: a declared model's key -> why start-up refused it."""
    return ModelRegistry([model.spec for model in models], [], "cpu", "float32", Settings(), _FakeLoader(models),
                         refusals)


def fake_manager(executor: BlockingExecutor, settings: Settings = Settings(),
                 open_stream: Optional[Callable[[FakeModel, int], FakeTokenStream]] = None,
                 registry: Any = None,
                 open_rows: Optional[Callable[[FakeModel, int, int], FakeRowsStream]] = None) -> SessionManager:
    """A session manager over the fake model (or ``registry``'s), its sessions on ``open_stream``'s
    fake streams (by default each says "hello world"), those of several rows on ``open_rows``'
    (by default each row says "hello world"); ``start`` it before use."""
    accounts = AccountBook(settings)
    admission = Admission(settings, key_session_limit=accounts.key_session_limit)
    metrics = SessionMetrics(open_sessions=lambda: admission.open_sessions, executor_queue_depth=lambda: 0,
                             reserved_state_bytes=lambda: admission.reserved_bytes,
                             state_budget_bytes=admission.memory_budget)
    registry = registry if registry is not None else FakeRegistry(FakeModel())
    return SessionManager(registry, admission, executor, SwarmMonitor(registry), metrics, settings, accounts,
                          open_stream=open_stream or (lambda model, max_length: FakeTokenStream()),
                          open_rows=open_rows or (lambda model, length, rows: FakeRowsStream(["hello world"], rows)))


class FakeServer:
    """The real application (``server.make_app``, as server.py builds it) served on a port of its
    own, on a real ``SessionManager`` over fake models: each session's stream is made by
    ``open_stream`` (a session of several rows: ``open_rows``) and kept in ``streams``, in the order
    they were opened, and ``opened`` lists each one's model and length. ``start`` it, and ``close`` it
    after the test."""

    def __init__(self, settings: Settings, models: Sequence[FakeModel],
                 open_stream: Callable[[FakeModel, int], FakeTokenStream], refusals: Optional[Dict[str, str]] = None,
                 open_rows: Callable[[FakeModel, int, int], FakeRowsStream] = (
                     lambda model, max_length, rows: FakeRowsStream(["hello world"], rows))):
        self.settings = settings
        self.streams: List[FakeTokenStream] = []
        self.opened: List[Tuple[str, int]] = []

        def opened(model: FakeModel, max_length: int) -> FakeTokenStream:
            stream = open_stream(model, max_length)
            self.streams.append(stream)
            self.opened.append((model.spec.key, max_length))
            return stream

        def opened_rows(model: FakeModel, max_length: int, rows: int) -> FakeRowsStream:
            stream = open_rows(model, max_length, rows)
            self.streams.append(stream)
            self.opened.append((model.spec.key, max_length))
            return stream

        self.manager = fake_manager(BlockingExecutor(2, "fake"), settings, opened, fake_registry(models, refusals),
                                    opened_rows)
        self.port = 0
        self._server: Optional[tornado.httpserver.HTTPServer] = None
        self._websockets: List[WSClient] = []
        self._http = tornado.httpclient.AsyncHTTPClient(force_instance=True)

    async def start(self) -> "FakeServer":
        from server import make_app

        await self.manager.start()
        sock, self.port = tornado.testing.bind_unused_port()
        self._server = tornado.httpserver.HTTPServer(make_app(self.settings, self.manager))
        self._server.add_socket(sock)
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def fetch(self, path: str, method: str = "GET", body: Any = None, headers: Optional[dict] = None,
                    **options: Any) -> tornado.httpclient.HTTPResponse:
        """The response, whatever its status (a ``dict`` body is sent as JSON)."""
        if isinstance(body, dict):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **(headers or {})}
        return await self._http.fetch(self.url(path), method=method, body=body, headers=headers, raise_error=False,
                                      request_timeout=20, **options)

    async def websocket(self, **options: Any) -> WSClient:
        """A client connected to ``/api/v2/generate`` (``options``: ``WSClient.connect``'s); ``close``
        closes it if the test did not."""
        client = await WSClient.connect(self.port, **options)
        self._websockets.append(client)
        return client

    async def close(self) -> None:
        for client in self._websockets:
            client.close()
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
        self._http.close()
        await self.manager.close(grace=1)
