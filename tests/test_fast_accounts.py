"""API keys on the wire, on fakes: who a request is, the limits it spends, the headers and refusals
clients see, and the usage a key reads about itself. The fake model answers one character per
token, so every count is known; the same is proven on the real swarm in test_accounts_swarm.py."""

import json

from sessions.accounts.store import KeyLimits
from tests.helpers import add_keys, bearer


async def complete(server, secret: str, prompt: str = "ab", max_tokens: int = 100, model: str = "fake/chat"):
    response = await server.fetch("/v1/completions", method="POST", headers=bearer(secret),
                                  body={"model": model, "prompt": prompt, "max_tokens": max_tokens})
    return response, json.loads(response.body)


async def test_a_key_spends_its_requests_per_minute_and_reads_them_in_openai_s_headers(serve_fakes, tmp_path):
    keys = add_keys(tmp_path / "keys.db", alice=KeyLimits(requests_per_minute=2, tokens_per_minute=1000))
    server = await serve_fakes(keys_db=tmp_path / "keys.db")
    first, _ = await complete(server, keys["alice"])
    assert first.code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 1000  # spent as the request runs
    await complete(server, keys["alice"])
    refused, error = await complete(server, keys["alice"])
    assert refused.code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 30
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert error["error"]["type"] == "rate_limit_error" and error["error"]["code"] == "rate_limit_exceeded"


async def test_unknown_keys_and_missing_keys_are_refused_and_anonymous_clients_are_only_when_allowed(
        serve_fakes, tmp_path):
    add_keys(tmp_path / "keys.db", alice=KeyLimits())
    server = await serve_fakes(keys_db=tmp_path / "keys.db")
    assert (await complete(server, "sk-swarm-guess"))[0].code == 401
    missing = await server.fetch("/v1/completions", method="POST", body={"model": "fake/chat", "prompt": "ab"})
    assert missing.code == 401
    open_server = await serve_fakes(keys_db=tmp_path / "keys.db", allow_anonymous=True,
                                    anonymous_requests_per_minute=1)
    first = await open_server.fetch("/v1/completions", method="POST", body={"model": "fake/chat", "prompt": "ab"})
    second = await open_server.fetch("/v1/completions", method="POST", body={"model": "fake/chat", "prompt": "ab"})
    assert (first.code, second.code) == (200, 429)


async def test_the_daily_budget_is_exact_to_the_token_and_usage_is_what_the_replies_said(serve_fakes, tmp_path):
    keys = add_keys(tmp_path / "keys.db", alice=KeyLimits(daily_tokens=31))
    server = await serve_fakes(keys_db=tmp_path / "keys.db", reply="hello world")
    usages, finish_reasons = [], []
    while True:
        response, reply = await complete(server, keys["alice"], prompt="ab")
        if response.code != 200:
            break
        usages.append(reply["usage"])
        finish_reasons.append(reply["choices"][0]["finish_reason"])
    assert response.code == 429 and reply["error"]["code"] == "insufficient_quota"
    assert int(response.headers["Retry-After"]) <= 86_400
    # "hello world" is 11 tokens and the end: 14 a reply with its prompt. The third gets the 3 left.
    assert [usage["total_tokens"] for usage in usages] == [14, 14, 3]
    assert finish_reasons == ["stop", "stop", "length"]
    report = json.loads((await server.fetch("/api/v1/usage", headers=bearer(keys["alice"]))).body)
    assert report["account"] == "alice" and report["limits"]["daily_tokens"] == 31
    assert report["remaining"]["daily_tokens"] == 0
    [today] = report["today"]["models"]
    assert today["requests"] == len(usages)
    assert today["prompt_tokens"] == sum(usage["prompt_tokens"] for usage in usages)
    assert today["completion_tokens"] == sum(usage["completion_tokens"] for usage in usages)
    assert report["today"]["total_tokens"] == 31


async def test_a_key_may_use_only_its_models(serve_fakes, tmp_path):
    from tests.fakes import chat_model

    keys = add_keys(tmp_path / "keys.db", alice=KeyLimits(models=("fake/a",)))
    server = await serve_fakes(keys_db=tmp_path / "keys.db", models=[chat_model("fake/a"), chat_model("fake/b")])
    assert (await complete(server, keys["alice"], model="fake/a"))[0].code == 200
    refused, error = await complete(server, keys["alice"], model="fake/b")
    assert refused.code == 403 and error["error"]["code"] == "model_not_allowed"


async def test_the_websocket_api_refuses_a_spent_budget_with_when_to_retry(serve_fakes, tmp_path):
    keys = add_keys(tmp_path / "keys.db", alice=KeyLimits(daily_tokens=8))
    server = await serve_fakes(keys_db=tmp_path / "keys.db", reply="hello world")
    client = await server.websocket(headers=bearer(keys["alice"]))
    await client.send({"type": "open_inference_session", "model": "fake/chat", "max_length": 64})
    assert (await client.receive())["ok"] is True
    await client.send({"type": "generate", "inputs": "ab", "max_new_tokens": 20, "id": 1})
    reply = await client.receive()
    assert reply["outputs"] == "hello " and reply["stop"] is True  # 2 + 6 tokens: the budget
    await client.send({"type": "generate", "inputs": "c", "max_new_tokens": 1, "id": 2})
    refused = await client.receive()
    assert refused["ok"] is False and refused["code"] == "quota_exceeded" and refused["id"] == 2
    assert 0 < refused["retry_after"] <= 86_400
