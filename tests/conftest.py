"""Shared fixtures: one real local Petals swarm for the whole run, and a connected manager.

The swarm runs on 127.0.0.1 and serves: two tiny random models the suite builds (a Llama and a
BLOOM), a tiny random model of each family built by a current transformers as the reference
(Llama 3.x, Mistral, Qwen2.5, Qwen3; each split over two nodes), and the real default chat
model, SmolLM2-135M-Instruct.
"""

import asyncio
import os
import sys
from pathlib import Path

import pytest
import tornado.ioloop

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from config import Settings  # noqa: E402
from model_specs import ChatSettings, FrontendSettings, ModelSpec, default_model  # noqa: E402

# petals, hivemind, torch and the model tools are imported by the fixtures that need them, so that
# the fast tier (``pytest -m "not swarm"``) neither waits for them nor starts hivemind's worker.

SWARM_READY_TIMEOUT = 300
# Tests whose fixtures include one of these need the real swarm or the real models (converted on
# the first run): they are marked ``swarm``.
SWARM_FIXTURES = {"local_swarm", "default_model_dir", "family_reference_dir"}
# Modules that start swarm nodes of their own (``LocalSwarm``) without those fixtures.
SWARM_MODULES = {"test_local_swarm.py"}
# Tests that start a Python process loading petals and torch: server.py (3-4 s each) or a pytest
# collecting the whole suite (8 s); with them the fast tier would take half as long again.
PROCESS_TESTS = {("test_families.py", "test_the_server_refuses_it_at_start_up_in_one_line"),
                 ("test_models_file.py", "test_the_server_exits_with_the_one_line"),
                 ("test_models_file.py", "test_the_server_exits_when_no_declared_model_can_be_served"),
                 ("test_doc_examples.py", "test_pytest_example_selects_tests")}
FAMILY_MODEL_NAMES = {"llama3": "Tiny Llama 3", "mistral": "Tiny Mistral", "qwen2": "Tiny Qwen2.5",
                      "qwen3": "Tiny Qwen3"}


# What the session manager's account book reads: an app served with other values of these gets a book of its own.
ACCOUNT_SETTINGS = {"keys_db", "anonymous_requests_per_minute", "anonymous_tokens_per_minute", "anonymous_daily_tokens"}


def use_accounts(manager, book) -> None:
    """Makes ``book`` the one ``manager`` identifies, limits and schedules clients by."""
    manager.accounts = book
    manager.admission.key_session_limit = book.key_session_limit
    manager.executor.weight_of = book.weight_of


def _needs_swarm(item: pytest.Item) -> bool:
    fixtures = set(item.fixturenames)
    # pytest-tornasync's ``http_server`` asks for the app fixture (``app``: the swarm's) only as it
    # starts, so that fixture is not in the closure: a test serving it needs the swarm as well.
    return (bool(fixtures & SWARM_FIXTURES) or "http_server" in fixtures or item.path.name in SWARM_MODULES
            or (item.path.name, getattr(item, "originalname", item.name)) in PROCESS_TESTS)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Marks ``swarm`` every test that needs the real swarm or the real models (``SWARM_FIXTURES``),
    starts swarm nodes of its own (``SWARM_MODULES``) or a process that loads petals
    (``PROCESS_TESTS``): ``pytest -m "not swarm"`` runs the fast tier alone."""
    for item in items:
        if _needs_swarm(item):
            item.add_marker(pytest.mark.swarm)


@pytest.fixture(scope="session")
def io_loop(request):
    """One event loop for the whole run, as the server has one (replaces pytest-tornasync's
    per-test loop, which uses deprecated calls and could not share the session manager)."""
    if any(item.get_closest_marker("swarm") for item in request.session.items):
        from swarm.petals_api import RemoteExpertWorker

        # hivemind's client worker installs uvloop's policy, dropping the current loop, the first
        # time it runs: let that happen before this run's loop is made current.
        RemoteExpertWorker.run_coroutine(asyncio.sleep(0))
    asyncio_loop = asyncio.new_event_loop()
    asyncio.set_event_loop(asyncio_loop)
    loop = tornado.ioloop.IOLoop.current()
    yield loop
    loop.close(all_fds=True)
    asyncio.set_event_loop(None)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Where converted models are cached between runs."""
    from swarm.default_model import DEFAULT_CACHE_DIR

    cache_dir = os.environ.get("SWARM_CHAT_MODELS_DIR")
    return Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR


@pytest.fixture(scope="session")
def default_model_dir(models_dir) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (converted on the first run)."""
    from swarm.default_model import ensure_default_model

    return ensure_default_model(models_dir)


@pytest.fixture(scope="session")
def tiny_model_specs(tmp_path_factory, default_model_dir):
    """The two tiny models as the server declares them."""
    from swarm.tiny_models import make_tiny_bloom, make_tiny_llama

    root = tmp_path_factory.mktemp("models")
    llama = make_tiny_llama(root / "tiny-llama", default_model_dir)
    bloom = make_tiny_bloom(root / "tiny-bloom", default_model_dir)
    chat = ChatSettings(max_session_length=512, sep_token="\n", stop_token="<|im_end|>")
    return (
        ModelSpec(repository="tests/tiny-llama", family="Tiny", path=llama,
                  aliases=("tl",), frontend=FrontendSettings(name="Tiny Llama"), chat=chat),
        ModelSpec(repository="tests/tiny-bloom", family="Tiny", path=bloom,
                  frontend=FrontendSettings(name="Tiny BLOOM"), chat=chat, public_api=False),
    )


@pytest.fixture(scope="session")
def family_reference_dir(models_dir, default_model_dir) -> Path:
    """The families' reference checkpoints and what a current transformers computes for them (cached)."""
    from tests.family_reference import build_reference

    return build_reference(models_dir, default_model_dir)


@pytest.fixture(scope="session")
def family_model_specs(tmp_path_factory, family_reference_dir, default_model_dir):
    """The families' tiny reference models as the server declares them (``tests/tiny-<family>``)."""
    from tests.family_reference import SWARM_FAMILIES, serving_folder

    root = tmp_path_factory.mktemp("families")
    chat = ChatSettings(max_session_length=512, sep_token="\n", stop_token="<|im_end|>")
    return tuple(
        ModelSpec(repository=f"tests/tiny-{family}", family="Families", chat=chat,
                  path=serving_folder(family_reference_dir, family, default_model_dir, root / family),
                  frontend=FrontendSettings(name=FAMILY_MODEL_NAMES[family]))
        for family in SWARM_FAMILIES)


@pytest.fixture(scope="session")
def model_specs(tiny_model_specs, family_model_specs, models_dir, default_model_dir):
    """Every model the test swarm serves."""
    return (*tiny_model_specs, *family_model_specs, default_model(models_dir))


@pytest.fixture(scope="session")
def local_swarm(tmp_path_factory, model_specs, family_model_specs):
    """One real swarm on loopback for the whole run: one server process per model, two for each
    family's reference model (each running half of its blocks)."""
    from swarm.local import LocalSwarm, SwarmModel, count_blocks

    swarm_models = [SwarmModel(str(spec.path), spec.swarm_prefix, count_blocks(str(spec.path))) for spec in model_specs]
    split = {str(spec.path) for spec in family_model_specs}
    with LocalSwarm(tmp_path_factory.mktemp("swarm-logs"), threads=1) as running_swarm:
        for model in swarm_models:
            if model.path in split:
                half = model.num_blocks // 2
                running_swarm.add_node(model, block_indices=f"0:{half}")
                running_swarm.add_node(model, block_indices=f"{half}:{model.num_blocks}")
            else:
                running_swarm.add_node(model)
        running_swarm.wait_until_ready(swarm_models, timeout=SWARM_READY_TIMEOUT)
        yield running_swarm


@pytest.fixture(scope="session")
def settings(model_specs, local_swarm) -> Settings:
    """Server settings pointing at the test swarm."""
    return Settings(models=model_specs, initial_peers=tuple(local_swarm.initial_peers), port=0,
                    device="cpu", torch_dtype="float32", executor_workers=4, step_timeout=60,
                    warm_sessions=0)  # prefix reuse is on only where a test turns it on (``warm_pool``)


@pytest.fixture(scope="session")
def manager(settings, io_loop):
    """A session manager connected to every model of the test swarm."""
    from sessions.serving.manager import build_manager

    manager = build_manager(settings.models, settings.initial_peers, settings.device, settings.torch_dtype,
                            settings=settings)
    io_loop.run_sync(manager.start)
    yield manager
    io_loop.run_sync(manager.close)


@pytest.fixture
def app(settings, manager):
    """The application under test, built by the same factory as server.py's."""
    from server import make_app

    return make_app(settings, manager)


@pytest.fixture
def serve_with(settings, manager, io_loop):
    """``serve_with(**changes)``: the port of the app serving ``settings`` with ``changes``
    (e.g. ``api_key``), on the shared manager; stopped after the test."""
    import dataclasses

    import tornado.httpserver
    import tornado.testing

    from server import make_app

    from sessions.accounts.book import AccountBook

    servers, shared_accounts = [], manager.accounts

    def serve(**changes) -> int:
        served = dataclasses.replace(settings, **changes)
        if ACCOUNT_SETTINGS & changes.keys():  # the manager identifies and limits clients by these
            use_accounts(manager, AccountBook(served))
            io_loop.run_sync(manager.accounts.start)
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(make_app(served, manager))
        server.add_socket(sock)
        servers.append(server)
        return port

    yield serve
    for server in servers:
        server.stop()
        io_loop.run_sync(server.close_all_connections)
    if manager.accounts is not shared_accounts:
        io_loop.run_sync(manager.accounts.close)
        use_accounts(manager, shared_accounts)


@pytest.fixture
def warm_pool(manager, io_loop):
    """``warm_pool(**limits)`` turns prefix reuse on in the shared manager for one test (its
    warm sessions are closed after it), once earlier tests' sessions are released."""
    from config import WarmPoolLimits
    from sessions.serving.warm_pool import WarmPool
    from tests.helpers import wait_for_no_sessions

    io_loop.run_sync(lambda: wait_for_no_sessions(manager))

    original = manager.warm

    def turn_on(**limits) -> WarmPool:
        manager.warm = WarmPool(WarmPoolLimits(**limits))
        return manager.warm

    yield turn_on
    pool, manager.warm = manager.warm, original

    async def close_warm_sessions():
        for session in pool.drain():
            await session.aclose("test done")

    io_loop.run_sync(close_warm_sessions)


@pytest.fixture
def ws_port(http_server, http_server_port) -> int:
    """The port of a running test server (for WebSocket clients)."""
    return http_server_port[1]


@pytest.fixture
def serve_fakes(io_loop):
    """``await serve_fakes(reply=..., **changes)``: a started ``tests.fakes.FakeServer``: the real
    app on a real session manager over fake models (``models``; by default one with a ChatML
    template, ``fake/chat``), with ``Settings`` ``changes``. Each session's stream answers
    ``reply`` one character per token (then the end of sequence), each step taking
    ``step_seconds``; the rows of a request of several choices answer ``row_replies`` (row ``i`` the
    ``i``-th, cycling; by default ``reply``); ``stream``: the class of those streams (a
    ``FakeTokenStream``). Needs neither the swarm nor petals' worker; closed after the test."""
    import dataclasses

    from tests.fakes import FakeRowsStream, FakeServer, FakeTokenStream, chat_model

    servers = []

    async def serve(reply: str = "hello world", step_seconds: float = 0.0, models=None, refusals=None,
                    row_replies=None, stream=FakeTokenStream, **changes):
        settings = dataclasses.replace(Settings(warm_sessions=0), **changes)  # no prefix reuse unless asked
        server = FakeServer(settings, models or [chat_model()],
                            lambda model, max_length: stream(reply, step_seconds), refusals,
                            lambda model, max_length, rows: FakeRowsStream(row_replies or [reply], rows, step_seconds))
        servers.append(server)
        return await server.start()

    yield serve
    for server in servers:
        io_loop.run_sync(server.close)
