"""API keys on the real swarm: the daily budget holds to the token with the official openai client,
the usage a key reads is what its replies said, and a server process keeps that usage across a
restart in its key database, without a word of what was asked or answered. The same on fakes,
where every count is known in advance: test_fast_accounts.py."""

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import tornado.httpclient

from sessions.accounts.store import KeyLimits, KeyStore
from tests.conftest import REPO_ROOT
from tests.helpers import add_keys, bearer
from tests.test_server_process import read_until_ready
from tests.ws_client import WSClient

TINY = "tests/tiny-llama"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MAX_TOKENS = 30
BUDGET = 120
# Stored usage must never hold what people wrote: a phrase that appears nowhere else.
PRIVATE_PROMPT = "My locker code is tangerine-kestrel-4417; what rhymes with it?"


@pytest.fixture
def keyed_server(serve_with, tmp_path):
    """The app on the test swarm with a key database of three keys: (its port, name -> secret).
    Served before the test runs, as the book opens its database on the test's event loop."""
    keys = add_keys(tmp_path / "keys.db", alice=KeyLimits(daily_tokens=BUDGET),
                    bob=KeyLimits(requests_per_minute=5, tokens_per_minute=200),
                    carol=KeyLimits(daily_tokens=10_000))
    return serve_with(keys_db=tmp_path / "keys.db"), keys


def openai_client(port: int, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret, max_retries=0)


async def usage_report(port: int, secret: str) -> dict:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/api/v1/usage",
                                                                headers=bearer(secret))
    return json.loads(response.body)


def usage_sums(usages) -> dict:
    """What a key's usage report must say of these replies' usage, for their one model."""
    return {"requests": len(usages),
            "prompt_tokens": sum(usage.prompt_tokens for usage in usages),
            "cached_tokens": sum(usage.prompt_tokens_details.cached_tokens for usage in usages),
            "completion_tokens": sum(usage.completion_tokens for usage in usages),
            "total_tokens": sum(usage.total_tokens for usage in usages)}


def reported(today_of_model: dict) -> dict:
    """A usage report's counts for one model, as ``usage_sums`` names them."""
    return {name: today_of_model[name]
            for name in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens")}


async def test_the_daily_budget_holds_on_the_swarm_and_the_usage_read_is_what_the_replies_said(
        keyed_server):
    port, keys = keyed_server
    client = openai_client(port, keys["alice"])

    stream = await client.chat.completions.create(model=TINY, messages=QUESTION, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    usages = [chunks[-1].usage]
    prompt_tokens = usages[0].prompt_tokens  # every request below sends the same prompt
    assert prompt_tokens > 0 and usages[0].completion_tokens > 0

    for _ in range(BUDGET):  # each reply spends at least a token: the budget ends this loop
        left = BUDGET - sum(usage.total_tokens for usage in usages)
        try:
            reply = await client.chat.completions.create(model=TINY, messages=QUESTION, max_tokens=MAX_TOKENS,
                                                         temperature=0)
        except openai.RateLimitError as error:
            refusal = error
            break
        # A generation is granted at most what the budget has left after its prompt.
        assert reply.usage.prompt_tokens == prompt_tokens
        assert 0 < reply.usage.completion_tokens <= min(MAX_TOKENS, left - prompt_tokens)
        usages.append(reply.usage)
    else:
        raise AssertionError(f"never refused, having spent {sum(usage.total_tokens for usage in usages)} tokens")
    assert refusal.status_code == 429 and refusal.code == "insufficient_quota"
    assert 0 < int(refusal.response.headers["retry-after"]) <= 86_400
    spent = sum(usage.total_tokens for usage in usages)
    # Refused only when what is left cannot hold the prompt and one token.
    assert spent <= BUDGET and BUDGET - spent < prompt_tokens + 1
    with pytest.raises(openai.RateLimitError) as refused_stream:  # before the stream starts, not inside it
        await client.chat.completions.create(model=TINY, messages=QUESTION, max_tokens=MAX_TOKENS, stream=True)
    assert refused_stream.value.code == "insufficient_quota"

    report = await usage_report(port, keys["alice"])
    assert report["account"] == "alice" and report["limits"]["daily_tokens"] == BUDGET
    assert report["remaining"]["daily_tokens"] == BUDGET - spent
    [today] = report["today"]["models"]
    assert today["model"] == TINY and reported(today) == usage_sums(usages)
    assert report["today"]["total_tokens"] == spent

    socket = await WSClient.connect(port, headers=bearer(keys["alice"]))
    try:
        assert (await socket.request({"type": "open_inference_session", "model": TINY, "max_length": 64}))["ok"]
        refused = await socket.request({"type": "generate", "inputs": "Hi", "max_new_tokens": 5, "id": 7})
    finally:
        socket.close()
    assert refused["ok"] is False and refused["code"] == "quota_exceeded" and refused["id"] == 7
    assert 0 < refused["retry_after"] <= 86_400
    assert (await usage_report(port, keys["alice"]))["today"]["total_tokens"] == spent  # the refusal spent nothing


async def test_a_key_with_rates_per_minute_reads_them_in_openai_s_headers(keyed_server):
    port, keys = keyed_server
    client = openai_client(port, keys["bob"])
    started = time.monotonic()
    first = await client.chat.completions.with_raw_response.create(model=TINY, messages=QUESTION, max_tokens=8)
    second = await client.chat.completions.with_raw_response.create(model=TINY, messages=QUESTION, max_tokens=8)
    elapsed = time.monotonic() - started
    assert first.headers["x-ratelimit-limit-requests"] == "5" and first.headers["x-ratelimit-limit-tokens"] == "200"
    # Requests are taken as they arrive (one back every 12 s); tokens as the generation runs.
    assert first.headers["x-ratelimit-remaining-requests"] == "4"
    assert second.headers["x-ratelimit-remaining-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-tokens"] == "200"
    spent = first.parse().usage.total_tokens
    refilled = elapsed * 200 / 60
    assert 200 - spent <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 200 - spent + refilled
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    # A key with a daily budget only has no rate to show.
    plain = await openai_client(port, keys["carol"]).chat.completions.with_raw_response.create(
        model=TINY, messages=QUESTION, max_tokens=2)
    assert not [name for name in plain.headers if name.lower().startswith("x-ratelimit-")]


@contextlib.contextmanager
def server_process(model_path: Path, initial_peers, keys_db: Path):
    """``server.py`` joined to the test swarm with the key database ``keys_db``: yields its URL,
    then stops it with SIGTERM as a service manager would, and checks that it exited cleanly."""
    process = subprocess.Popen(
        [sys.executable, "server.py", "--model", str(model_path), "--port", "0", "--host", "127.0.0.1",
         "--initial-peers", *initial_peers, "--keys-db", str(keys_db)],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        url, _ = read_until_ready(process)
        yield url
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=45)
        assert process.returncode == 0, log[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def read_usage(url: str, secret: str) -> dict:
    request = urllib.request.Request(url + "api/v1/usage", headers=bearer(secret))
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def test_usage_survives_a_restart_of_the_server_process_and_keeps_no_text(tiny_model_specs, local_swarm, tmp_path):
    tiny_llama = tiny_model_specs[0]
    keys_db = tmp_path / "keys.db"
    budget = 10_000
    keys = add_keys(keys_db, dave=KeyLimits(daily_tokens=budget))
    question = [{"role": "user", "content": PRIVATE_PROMPT}]

    with server_process(tiny_llama.path, local_swarm.initial_peers, keys_db) as url:
        client = openai.OpenAI(base_url=url + "v1", api_key=keys["dave"], max_retries=0)
        replies = [client.chat.completions.create(model="tiny-llama", messages=question, max_tokens=12, temperature=0)
                   for _ in range(2)]
        [before] = read_usage(url, keys["dave"])["today"]["models"]
    sums = usage_sums([reply.usage for reply in replies])
    assert before["model"] == "tiny-llama" and reported(before) == sums

    store = KeyStore(keys_db)
    try:
        [row] = store.usage(key="dave")
    finally:
        store.close()
    assert (row.model, row.requests, row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
        "tiny-llama", 2, sums["prompt_tokens"], sums["cached_tokens"], sums["completion_tokens"])
    [tiny_node] = [node for node in local_swarm.nodes if node.model.path == str(tiny_llama.path)]
    # One node holds every block of the tiny model: it served both generations.
    [(server, generations)] = row.servers.items()
    assert generations == 2 and server in tiny_node.log_path.read_text(errors="replace")

    with server_process(tiny_llama.path, local_swarm.initial_peers, keys_db) as url:
        after = read_usage(url, keys["dave"])
    assert [reported(today) for today in after["today"]["models"]] == [sums]
    assert after["today"]["total_tokens"] == sums["total_tokens"]
    assert after["remaining"]["daily_tokens"] == budget - sums["total_tokens"]

    texts = [PRIVATE_PROMPT, "tangerine-kestrel", *(reply.choices[0].message.content for reply in replies)]
    assert all(len(text) >= 10 for text in texts)  # long enough not to turn up by chance
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("keys.db*"))
    assert keys_db.stat().st_size > 0 and b"dave" in stored
    assert [text for text in texts if text.encode() in stored] == []
