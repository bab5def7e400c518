"""Faults in a swarm of several server processes: the only holder of some blocks dies, and it
comes back, all while the backend keeps running; and a server whose attention cache is too
small for a session. (A server dying mid-stream while others can take over is
``test_failover.py``, which also checks the text.)

The swarm here is separate from the suite's: a tiny Llama served whole ("pair"), split
in halves across two processes ("split"), and on a server with a tiny attention cache
("small-cache"). Its nodes re-announce every 2 s, with records that expire after 5 s, so a
crashed node drops out of the DHT within seconds, not minutes.
"""

import asyncio
import dataclasses
import json
import time

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing

from config import Settings
from model_specs import FrontendSettings, ModelSpec
from sessions.serving.manager import build_manager
from swarm.local import LocalSwarm, SwarmModel, count_blocks
from tests.browser import ChatPage, drive, start_chromium
from tests.helpers import wait_for_no_sessions
from tests.ws_client import WSClient

PAIR, SPLIT, SMALL_CACHE = "tests/fault-pair", "tests/fault-split", "tests/fault-small-cache"
# Attention cache of the small-cache server, in tokens: enough for a short session only.
SMALL_CACHE_TOKENS = 64
NODE_OPTIONS = ("--update-period", "2", "--expiration", "5")
# A crashed server's connections are not always reset: a silent one counts as failed after this.
REQUEST_TIMEOUT = 5
# The backend's clients re-read the DHT this often, so they see a server leave or come back.
ROUTING_UPDATE_PERIOD = 2
READY_TIMEOUT = 180
ROUTE_CHANGE_TIMEOUT = 30


@dataclasses.dataclass
class FaultSwarm:
    """The fault-test swarm, its models and the nodes the tests stop and start."""

    swarm: LocalSwarm
    split: SwarmModel
    split_tail: object  # the only node holding the split model's second half

    def restart_split_tail(self) -> None:
        half = self.split.num_blocks // 2
        self.split_tail = self.swarm.add_node(self.split, f"{half}:{self.split.num_blocks}", NODE_OPTIONS)


@pytest.fixture(scope="module")
def fault_swarm(tmp_path_factory, tiny_model_specs):
    llama_path = str(tiny_model_specs[0].path)
    blocks = count_blocks(llama_path)
    pair = SwarmModel(llama_path, "fault-pair", blocks)
    split = SwarmModel(llama_path, "fault-split", blocks)
    small_cache = SwarmModel(llama_path, "fault-small-cache", blocks)
    with LocalSwarm(tmp_path_factory.mktemp("fault-swarm-logs"), threads=1) as swarm:
        swarm.add_node(pair, extra_options=NODE_OPTIONS)
        swarm.add_node(split, f"0:{blocks // 2}", NODE_OPTIONS)
        tail = swarm.add_node(split, f"{blocks // 2}:{blocks}", NODE_OPTIONS)
        swarm.add_node(small_cache, extra_options=(*NODE_OPTIONS, "--attn-cache-tokens", str(SMALL_CACHE_TOKENS)))
        swarm.wait_until_ready([pair, split, small_cache], timeout=READY_TIMEOUT)
        yield FaultSwarm(swarm, split, tail)


@pytest.fixture(scope="module")
def fault_server(io_loop, fault_swarm, tiny_model_specs):
    """A backend connected to the fault swarm, served on a port of its own."""
    from server import make_app

    base = tiny_model_specs[0]
    specs = tuple(ModelSpec(repository=name, family="Fault", path=base.path, dht_prefix=prefix, chat=base.chat,
                            frontend=FrontendSettings(name=prefix))
                  for name, prefix in ((PAIR, "fault-pair"), (SPLIT, "fault-split"),
                                       (SMALL_CACHE, "fault-small-cache")))
    settings = Settings(models=specs, initial_peers=tuple(fault_swarm.swarm.initial_peers), port=0, device="cpu",
                        torch_dtype="float32", executor_workers=4, step_timeout=60)
    manager = build_manager(specs, settings.initial_peers, "cpu", "float32",
                            settings=Settings(executor_workers=4, step_timeout=60, request_timeout=REQUEST_TIMEOUT,
                                                     routing_update_period=ROUTING_UPDATE_PERIOD))
    io_loop.run_sync(manager.start)
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(make_app(settings, manager))
    server.add_sockets([sock])
    yield manager, port
    server.stop()
    io_loop.run_sync(manager.close)


async def get_ready(port):
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/ready", raise_error=False)
    body = json.loads(response.body)
    return response.code, {model["model"]: model for model in body["models"]}


async def wait_for_ready(port, condition, timeout=ROUTE_CHANGE_TIMEOUT):
    """Polls /ready until ``condition(code, models)`` holds; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        code, models = await get_ready(port)
        if condition(code, models) or time.monotonic() > deadline:
            return code, models
        await asyncio.sleep(0.5)


async def generate_once(port, model, inputs="Hello there", max_new_tokens=4, max_length=64):
    """A fresh session on ``model`` and one generation in it: the last reply."""
    client = await WSClient.connect(port)
    try:
        opened = await client.request({"type": "open_inference_session", "model": model,
                                       "max_length": max_length})
        if not opened["ok"]:
            return opened
        replies = await client.stream({"type": "generate", "inputs": inputs, "max_new_tokens": max_new_tokens})
        return replies[-1]
    finally:
        client.close()


async def test_only_holder_of_blocks_dies_then_returns(fault_server, fault_swarm):
    manager, port = fault_server
    assert (await generate_once(port, SPLIT))["ok"]
    client = await WSClient.connect(port)
    try:
        assert (await client.request({"type": "open_inference_session", "model": SPLIT, "max_length": 64}))["ok"]
        assert (await client.stream({"type": "generate", "inputs": "Hi", "max_new_tokens": 2}))[-1]["ok"]
        fault_swarm.swarm.stop_node(fault_swarm.split_tail, crash=True)
        failed = (await client.stream({"type": "generate", "inputs": " again", "max_new_tokens": 2}))[-1]
    finally:
        client.close()
    assert failed["ok"] is False and failed["retryable"] is True
    assert failed["code"] in ("peer_failure", "missing_blocks"), failed

    half, blocks = fault_swarm.split.num_blocks // 2, fault_swarm.split.num_blocks
    code, models = await wait_for_ready(port, lambda code, models: not models[SPLIT]["ready"])
    assert code == 503 and models[SPLIT]["ready"] is False, models
    assert models[SPLIT]["missing_blocks"] == list(range(half, blocks))
    assert models[PAIR]["ready"] is True  # the other model is untouched

    missing = await generate_once(port, SPLIT)
    assert missing["ok"] is False and missing["code"] == "missing_blocks"
    assert f"blocks {half}-{blocks - 1} of {SPLIT}" in missing["traceback"]
    assert (await generate_once(port, PAIR))["ok"]  # the backend keeps serving everything else
    await wait_for_no_sessions(manager)  # the failed sessions were released too

    fault_swarm.restart_split_tail()
    code, models = await wait_for_ready(port, lambda code, models: code == 200, timeout=READY_TIMEOUT)
    assert code == 200 and models[SPLIT]["ready"], models
    back = await generate_once(port, SPLIT)
    assert back["ok"] and back["token_count"] == 4, back


async def test_a_session_larger_than_the_attention_cache_is_out_of_capacity(fault_server):
    manager, port = fault_server
    full = await generate_once(port, SMALL_CACHE, max_length=8 * SMALL_CACHE_TOKENS)
    assert full["ok"] is False and full["code"] == "cache_full" and full["retryable"] is True, full
    assert "attention cache is full" in full["traceback"]
    fits = await generate_once(port, SMALL_CACHE, max_length=SMALL_CACHE_TOKENS // 4)
    assert fits["ok"] and fits["token_count"] == 4, fits


async def test_a_session_waits_for_the_attention_cache_another_session_holds(fault_server):
    """The swarm's server holds a new session's first step until its cache has room (petals'
    --max_alloc_timeout), within the client's --request-timeout: the session waits, then runs."""
    manager, port = fault_server
    holder, waiting = await WSClient.connect(port), await WSClient.connect(port)
    try:
        for client in (holder, waiting):  # each fits the cache alone, not both together
            opened = await client.request({"type": "open_inference_session", "model": SMALL_CACHE,
                                           "max_length": SMALL_CACHE_TOKENS * 3 // 4})
            assert opened["ok"], opened
        assert (await holder.stream({"type": "generate", "inputs": "Hello", "max_new_tokens": 2}))[-1]["ok"]
        await waiting.send({"type": "generate", "inputs": "Hello", "max_new_tokens": 2})
        with pytest.raises(asyncio.TimeoutError):  # no room in the cache yet: it waits
            await waiting.receive(timeout=1.0)
        holder.close()  # releases its cache: the waiting session's first step goes through
        reply = await waiting.receive(timeout=60)
        assert reply["ok"] and reply["stop"] and reply["token_count"] == 2, reply
    finally:
        holder.close()
        waiting.close()
    await wait_for_no_sessions(manager)


async def test_chat_page_says_out_of_capacity(fault_server, tmp_path):
    manager, port = fault_server
    chromium = start_chromium()
    page = ChatPage(chromium, f"http://127.0.0.1:{port}/")

    def steps():
        page.open()
        page.choose_model("fault-small-cache")  # the page opens sessions of 512 tokens or more
        page.send("Hello")
        page.wait(page.error_text, message="the error box appears")
        assert "out of capacity" in page.error_text()
        page.screenshot(tmp_path / "out-of-capacity.png")

    try:
        await drive(page, tmp_path, steps)
    finally:
        chromium.quit()
