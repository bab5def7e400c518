"""POST /api/v1/generate: forms, query strings, JSON bodies, and malformed requests."""

import asyncio
import dataclasses
import json
import urllib.parse

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web

from handlers.context import context_settings
from handlers.http_generate import GenerateHandler
from tests.helpers import send_raw_post, wait_for_no_sessions

TINY = "tests/tiny-llama"


async def post(client, body, content_type="application/x-www-form-urlencoded", query=""):
    try:
        response = await client.fetch("/api/v1/generate" + query, method="POST", body=body,
                                      headers={"Content-Type": content_type}, raise_error=False)
    except tornado.httpclient.HTTPClientError as error:
        response = error.response
    return response.code, json.loads(response.body)


async def test_form_body_greedy_matches_the_websocket_api(http_server_client, manager):
    from sessions.engine.token_stream import TokenStream

    code, reply = await post(http_server_client, urllib.parse.urlencode(
        {"model": TINY, "inputs": "A cat sat on", "max_new_tokens": "8", "do_sample": "0"}))
    assert code == 200 and reply["ok"] is True
    loaded = manager.registry.find(TINY)
    stream = TokenStream(loaded, 64)
    try:
        ids = stream.step(loaded.encode("A cat sat on")) + [token for _ in range(7) for token in stream.step()]
    finally:
        stream.close()
    assert reply["outputs"] == loaded.tokenizer.decode(ids, skip_special_tokens=False,
                                                       clean_up_tokenization_spaces=False).rstrip("\ufffd")


async def test_form_fields_keep_their_whitespace(http_server_client):
    prompt = "  A cat sat on\n"
    code, form = await post(http_server_client, urllib.parse.urlencode(
        {"model": TINY, "inputs": prompt, "max_new_tokens": "6"}))
    code, stripped = await post(http_server_client, urllib.parse.urlencode(
        {"model": TINY, "inputs": prompt.strip(), "max_new_tokens": "6"}))
    code, body = await post(http_server_client, json.dumps({"model": TINY, "inputs": prompt, "max_new_tokens": 6}),
                            content_type="application/json")
    assert form["outputs"] == body["outputs"] != stripped["outputs"]


async def test_json_body_and_query_string(http_server_client):
    code, reply = await post(http_server_client, json.dumps({"model": TINY, "inputs": "Hello", "max_length": 6}),
                             content_type="application/json")
    assert code == 200 and reply["ok"]
    code, reply = await post(http_server_client, b"", query="?model=tl&inputs=Hello&max_new_tokens=2&do_sample=true")
    assert code == 200 and reply["ok"]


@pytest.mark.parametrize(
    "body, content_type, status, expected",
    [
        ("model=tests/tiny-llama&inputs=Hi", "application/x-www-form-urlencoded", 400, "max_length or max_new_tokens"),
        ("model=tests/tiny-llama&inputs=Hi&max_new_tokens=many", "application/x-www-form-urlencoded", 400,
         "must be an integer"),
        ("model=tests/tiny-llama&inputs=Hi&max_new_tokens=2&do_sample=perhaps", "application/x-www-form-urlencoded",
         400, "do_sample"),
        ("model=nope/nope&inputs=Hi&max_new_tokens=2", "application/x-www-form-urlencoded", 404, "Unknown model"),
        ("model=tests/tiny-llama&max_new_tokens=2", "application/x-www-form-urlencoded", 400, "inputs"),
        ("model=tests/tiny-llama&inputs=Hi&max_new_tokens=99999", "application/x-www-form-urlencoded", 400,
         "exceeds this model's limit of 2048"),
        ("model=tests/tiny-llama&inputs=Hi&max_new_tokens=2000", "application/x-www-form-urlencoded", 400,
         "maximum session length"),
        ("{broken", "application/json", 400, "not valid JSON"),
        ("[1]", "application/json", 400, "must be a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "application/json", 400, "RecursionError"),
        ("model=tests/tiny-llama&inputs=Hi&max_new_tokens=%C2%B2", "application/x-www-form-urlencoded", 400,
         "must be an integer"),
        ("model=tests/tiny-llama&inputs=Hi&max_new_tokens=" + "9" * 5000, "application/x-www-form-urlencoded", 400,
         "must be an integer"),
        ("model=tests/tiny-bloom&inputs=Hi&max_new_tokens=2", "application/x-www-form-urlencoded", 403,
         "only served to this server's own chat page"),
        ("model=tests/tiny-llama&inputs=Hi&max_new_tokens=2&temperature=inf&repetition_penalty=inf",
         "application/x-www-form-urlencoded", 400, "temperature must be a finite number"),
        ("model=tests/tiny-llama&inputs=Hi&max_new_tokens=2&top_p=1e999", "application/x-www-form-urlencoded", 400,
         "top_p must be a finite number"),
        ('{"model": "tl", "inputs": "Hi", "max_new_tokens": 2, "repetition_penalty": NaN}', "application/json", 400,
         "repetition_penalty must be a finite number"),
    ],
)
async def test_malformed_requests(http_server_client, manager, body, content_type, status, expected):
    before = manager.open_session_count  # an earlier test's sessions may still be closing
    code, reply = await post(http_server_client, body, content_type=content_type)
    assert code == status
    assert reply["ok"] is False and expected in reply["traceback"]
    assert "File \"" not in reply["traceback"]
    assert manager.open_session_count <= before


async def test_client_leaving_mid_request_frees_its_session(ws_port, manager):
    body = "model=smollm2&inputs=Once+upon+a+time&max_new_tokens=200"
    reader, writer = await send_raw_post(ws_port, "/api/v1/generate", body.encode(),
                                         "application/x-www-form-urlencoded")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while manager.open_session_count == 0:
        assert loop.time() < deadline, "the request never opened a session"
        await asyncio.sleep(0.01)
    writer.close()
    # The 200 tokens would take over 10 s (about 70 ms a step here); leaving must end it at once.
    seconds = await wait_for_no_sessions(manager, timeout=10)
    assert seconds < 3


@pytest.mark.parametrize("path", ["/api/v1/generate", "/v1/completions"])
async def test_a_body_over_the_limit_is_refused_unread(ws_port, manager, path):
    """The reply comes as soon as the headers announce too much, before the body is sent."""
    body = b'{"model": "tl", "prompt": "' + b"x" * (2 << 20) + b'"}'
    before = manager.open_session_count  # an earlier test's sessions may still be closing
    reader, writer = await asyncio.open_connection("127.0.0.1", ws_port)
    writer.write((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 413"), head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    reply = json.loads(await reader.readexactly(length))
    writer.close()
    assert "payload_too_large" in json.dumps(reply) and str(1 << 20) in json.dumps(reply)
    assert manager.open_session_count <= before


class TrackedGenerateHandler(GenerateHandler):
    """The generation handler, each instance kept for the test to look at."""

    started = []

    async def prepare(self) -> None:
        type(self).started.append(self)
        await super().prepare()


@pytest.mark.parametrize("chunks", [[b"x" * 100], [b"x" * 600, b"x" * 600]], ids=["cut-off", "over-the-limit"])
async def test_an_upload_cut_off_or_over_the_limit_ends_its_request(settings, manager, io_loop, chunks):
    """Chunked bodies: the handler, and the part of the body it holds, must not wait forever."""
    app = tornado.web.Application([("/generate", TrackedGenerateHandler)],
                                  **context_settings(dataclasses.replace(settings, max_body_bytes=1000), manager))
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(app)
    server.add_socket(sock)
    TrackedGenerateHandler.started.clear()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for chunk in chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not TrackedGenerateHandler.started:
            assert loop.time() < deadline, "the request never reached its handler"
            await asyncio.sleep(0.02)
        writer.close()
        [handler] = TrackedGenerateHandler.started
        while not handler.request._body_future.done():  # Tornado's wait for the rest of the body
            assert loop.time() < deadline, "the handler still waits for the rest of the body"
            await asyncio.sleep(0.02)
    finally:
        TrackedGenerateHandler.started.clear()
        server.stop()
        await server.close_all_connections()


async def test_max_length_alone_may_not_ask_for_more_new_tokens_than_the_limit(http_server_client, manager,
                                                                              monkeypatch):
    """Without max_new_tokens the reply runs up to max_length: its new tokens count against the limit."""
    import dataclasses

    loaded = manager.registry.find(TINY)
    monkeypatch.setattr(loaded, "spec", dataclasses.replace(loaded.spec, max_new_tokens_limit=8))
    prompt_tokens = len(loaded.encode("A cat sat on"))
    code, reply = await post(http_server_client, json.dumps({"model": TINY, "inputs": "A cat sat on",
                                                             "max_length": prompt_tokens + 9}), "application/json")
    assert code == 400 and reply["code"] == "invalid_request"
    assert f"leaves room for 9 new tokens after the prompt's {prompt_tokens}" in reply["traceback"]
    assert "limit of 8" in reply["traceback"]
    await wait_for_no_sessions(manager)
    for fits in ({"max_length": prompt_tokens + 8}, {"max_length": 100, "max_new_tokens": 8}):
        code, reply = await post(http_server_client, json.dumps({"model": TINY, "inputs": "A cat sat on", **fits}),
                                 "application/json")
        assert code == 200 and reply["ok"], fits


def test_the_new_tokens_a_request_may_generate_are_checked_once_its_prompt_is_counted():
    from model_specs import FrontendSettings, ModelSpec
    from sessions import request_rules
    from sessions.errors import InvalidRequest
    from sessions.requests import GenerationRequest

    spec = ModelSpec(repository="a/b", family="b", frontend=FrontendSettings(name="b"), max_new_tokens_limit=10)
    prompt = tuple(range(5))
    for fits in (GenerationRequest(input_ids=prompt, max_length=15),
                 GenerationRequest(input_ids=prompt, max_length=100, max_new_tokens=10),
                 GenerationRequest(input_ids=prompt, max_new_tokens=10)):
        request_rules.check_new_tokens(spec, fits)
    # Streamed (until a stop or max_length): max_new_tokens bounds each reply, not the generation.
    for too_many in (GenerationRequest(input_ids=prompt, max_length=16),
                     GenerationRequest(input_ids=prompt, max_length=16, max_new_tokens=1, until_length=True)):
        with pytest.raises(InvalidRequest, match="leaves room for 11 new tokens after the prompt's 5"):
            request_rules.check_new_tokens(spec, too_many)
