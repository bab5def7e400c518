"""``--api-key``: every API that serves models asks for it, in the ways real clients send it."""

import base64
import json

import openai
import pytest
import tornado.httpclient
import tornado.httputil

from config import Settings
from handlers.auth import KEY_SUBPROTOCOL_PREFIX, SUBPROTOCOL, presented_key
from sessions.accounts.book import AccountBook
from sessions.accounts.store import KeyLimits
from sessions.errors import Unauthorized
from tests.helpers import wait_for_no_sessions
from tests.ws_client import WSClient

KEY = "s3cret-key"
TINY = "tests/tiny-llama"


def key_subprotocol(key: str) -> str:
    return KEY_SUBPROTOCOL_PREFIX + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def request_with(headers: dict) -> tornado.httputil.HTTPServerRequest:
    return tornado.httputil.HTTPServerRequest(start_line=tornado.httputil.RequestStartLine("GET", "/", "HTTP/1.1"),
                                              headers=tornado.httputil.HTTPHeaders(dict(headers, Host="x")))


def test_the_key_is_read_from_a_bearer_header_or_a_subprotocol():
    assert presented_key(request_with({"Authorization": f"Bearer {KEY}"})) == KEY
    unicode_key = "ключ"  # a header cannot carry it; the page's subprotocol form can
    assert presented_key(request_with({"Sec-WebSocket-Protocol": f"{SUBPROTOCOL}, {key_subprotocol(unicode_key)}"})
                         ) == unicode_key
    assert presented_key(request_with({"Authorization": "Basic dXNlcjpwYXNz"})) is None
    assert presented_key(request_with({"Sec-WebSocket-Protocol": KEY_SUBPROTOCOL_PREFIX + "!!"})) is None
    assert presented_key(request_with({"Authorization": f"bearer {KEY}"})) == KEY


def test_the_api_key_is_required_and_compared_whole():
    book = AccountBook(Settings())
    assert book.identify(None, "10.0.0.1").client == "10.0.0.1"
    assert book.identify("anything", "10.0.0.1").account.limits == KeyLimits()  # no key configured: not looked at
    for presented in (None, KEY + "x", KEY[:-1], ""):
        with pytest.raises(Unauthorized):
            book.identify(presented, "10.0.0.1", api_key=KEY)
    caller = book.identify(KEY, "10.0.0.1", api_key=KEY)
    assert caller.client == "api-key:10.0.0.1" and caller.account.name == "api-key"
    assert caller.account.limits == KeyLimits()
    assert book.account_for(caller.client) is caller.account
    anonymous = book.identify(None, "10.0.0.1", api_key=KEY, allow_anonymous=True)  # the key is optional
    assert anonymous.client == "10.0.0.1" and anonymous.account.name == "anonymous"


@pytest.fixture
def keyed_port(serve_with):
    """A port serving the app with ``--api-key`` set."""
    return serve_with(api_key=KEY)


async def fetch(port: int, path: str, headers: dict = None, **options) -> tornado.httpclient.HTTPResponse:
    return await tornado.httpclient.AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}{path}", headers=headers,
                                                            raise_error=False, **options)


@pytest.mark.parametrize("method, path", [("GET", "/api/v1/models"), ("POST", "/api/v1/generate"),
                                          ("GET", "/v1/models"), ("POST", "/v1/completions"),
                                          ("POST", "/v1/chat/completions")])
async def test_every_api_that_serves_models_answers_401_without_the_key(keyed_port, method, path):
    body = b"{}" if method == "POST" else None
    for headers in ({}, {"Authorization": "Bearer guess"}):
        response = await fetch(keyed_port, path, headers, method=method, body=body)
        assert response.code == 401, (path, headers)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        reply = json.loads(response.body)
        code = reply["error"]["code"] if path.startswith("/v1") else reply["code"]
        assert code == ("invalid_api_key" if path.startswith("/v1") else "unauthorized")


async def test_probes_metrics_and_the_page_stay_open(keyed_port):
    for path in ("/health", "/ready", "/metrics", "/api/v1/swarm", "/"):
        assert (await fetch(keyed_port, path)).code == 200, path


async def test_the_right_key_opens_the_http_apis(keyed_port, manager):
    authorized = {"Authorization": f"Bearer {KEY}"}
    models = json.loads((await fetch(keyed_port, "/api/v1/models", authorized)).body)
    assert TINY in [model["model"] for model in models["models"]]
    reply = await fetch(keyed_port, "/api/v1/generate", dict(authorized, **{"Content-Type": "application/json"}),
                        method="POST",
                        body=json.dumps({"model": TINY, "inputs": "Hi", "max_new_tokens": 2}))
    assert reply.code == 200 and json.loads(reply.body)["ok"] is True

    wrong = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{keyed_port}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.models.list()
    right = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{keyed_port}/v1", api_key=KEY, max_retries=0)
    assert TINY in [model.id for model in (await right.models.list()).data]
    await wait_for_no_sessions(manager)


async def test_the_websocket_refuses_the_handshake_without_the_key(keyed_port, manager):
    before = manager.open_session_count  # an earlier test's sessions may still be closing
    for attempt in ({}, {"headers": {"Authorization": "Bearer guess"}},
                    {"subprotocols": [SUBPROTOCOL, key_subprotocol("guess")]}):
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            await WSClient.connect(keyed_port, **attempt)
        assert refused.value.code == 401, attempt
    assert manager.open_session_count <= before


@pytest.mark.parametrize("attempt", [{"headers": {"Authorization": f"Bearer {KEY}"}},
                                     {"subprotocols": [SUBPROTOCOL, key_subprotocol(KEY)]}],
                         ids=["header", "subprotocol"])
async def test_the_websocket_with_the_key_generates(keyed_port, manager, attempt):
    client = await WSClient.connect(keyed_port, **attempt)
    if "subprotocols" in attempt:  # a browser drops a socket whose offered subprotocol was not chosen
        assert client.connection.selected_subprotocol == SUBPROTOCOL
    assert (await client.request({"type": "open_inference_session", "model": TINY, "max_length": 16}))["ok"]
    replies = await client.stream({"type": "generate", "inputs": "Hi", "max_new_tokens": 2})
    assert replies[-1]["ok"] and replies[-1]["stop"]
    client.close()
    await wait_for_no_sessions(manager)


async def test_browsers_may_call_the_openai_api_across_origins(keyed_port):
    origin = {"Origin": "https://app.example.org"}
    preflight = await fetch(keyed_port, "/v1/chat/completions", dict(origin, **{
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}),
        method="OPTIONS")
    assert preflight.code == 204  # a preflight carries no key, and needs none
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    refused = await fetch(keyed_port, "/v1/models", origin)
    assert refused.code == 401 and refused.headers["Access-Control-Allow-Origin"] == "*"  # readable by the page
    listed = await fetch(keyed_port, "/v1/models", dict(origin, Authorization=f"Bearer {KEY}"))
    assert listed.code == 200 and listed.headers["Access-Control-Allow-Origin"] == "*"


async def test_allowed_origins_narrow_cors(serve_with):
    port = serve_with(allowed_origins=("https://app.example.org",))
    allowed = await fetch(port, "/v1/models", {"Origin": "https://app.example.org"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
    other = await fetch(port, "/v1/models", {"Origin": "https://elsewhere.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
