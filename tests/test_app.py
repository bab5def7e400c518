"""The application skeleton: model list, page, JSON errors."""

import json

import pytest
import tornado.httpclient


async def test_models_lists_every_served_model(http_server_client, model_specs):
    response = await http_server_client.fetch("/api/v1/models")
    body = json.loads(response.body)
    assert response.code == 200
    assert body["ok"] is True
    assert [entry["model"] for entry in body["models"]] == [spec.key for spec in model_specs]
    assert all(entry["available"] is True and "error" not in entry for entry in body["models"])
    by_key = {entry["model"]: entry for entry in body["models"]}
    llama = by_key["tests/tiny-llama"]
    assert llama["aliases"] == ["tl"]
    assert llama["family"] == "Tiny"
    assert llama["num_blocks"] == 4
    assert llama["frontend"]["name"] == "Tiny Llama"
    assert llama["chat"]["stop_token"] == "<|im_end|>"
    assert by_key["tests/tiny-bloom"]["public_api"] is False
    default = by_key["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert default["num_blocks"] == 30
    assert default["chat"]["max_session_length"] == 8192


async def test_index_page_is_served(http_server_client):
    response = await http_server_client.fetch("/", follow_redirects=True)
    assert response.code == 200
    assert b"<html" in response.body
    assert response.headers["Content-Type"].startswith("text/html")


async def test_unknown_path_answers_json_404(http_server_client):
    with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
        await http_server_client.fetch("/api/v1/nothing-here")
    assert caught.value.code == 404
    body = json.loads(caught.value.response.body)
    assert body["ok"] is False
    assert "/api/v1/nothing-here" in body["traceback"]
    assert "File \"" not in body["traceback"]


async def test_wrong_method_answers_json_405(http_server_client):
    with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
        await http_server_client.fetch("/api/v1/models", method="POST", body="")
    assert caught.value.code == 405
    assert json.loads(caught.value.response.body)["ok"] is False


def test_find_model_by_alias_and_unknown(manager):
    from sessions.errors import UnknownModel

    assert manager.registry.find("tl").spec.key == "tests/tiny-llama"
    with pytest.raises(UnknownModel, match="nope") as unknown:
        manager.registry.find("nope")
    assert "tests/tiny-llama" in str(unknown.value)
    # A caller that may use only public models is told only of them.
    with pytest.raises(UnknownModel) as unknown:
        manager.registry.find("nope", trusted=False)
    assert "tests/tiny-llama" in str(unknown.value) and "tests/tiny-bloom" not in str(unknown.value)
