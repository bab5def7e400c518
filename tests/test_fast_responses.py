"""``/v1/responses`` on fakes: the real app and session manager over a fake ChatML model whose
streams answer a set text one character per token (``tests.fakes``). The response's shape, the
stream's typed events, stored responses and who sees them, the conversation a continued response
feeds, and refusals. The official client, tools and warm sessions on the swarm are proven in
test_responses_api.py."""

import json

from sessions.accounts.limits import KeyLimits
from tests.helpers import add_keys, bearer, wait_for_no_sessions

ANSWER = "Paris.<|im_end|>\nmore text the model would write"
ASKED = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"


def fed_text(stream) -> str:
    return "".join(chr(token) for token in stream.fed)


async def respond(server, body: dict, headers: dict = None, method: str = "POST", path: str = "/v1/responses"):
    response = await server.fetch(path, method=method, body=body if method == "POST" else None, headers=headers)
    return response, json.loads(response.body)


def typed_events(body: bytes) -> list:
    """The events of a stream: each block's ``event:`` name must be its data's ``type``."""
    events = []
    for block in body.decode().strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {event['type']}"
        events.append(event)
    return events


async def test_a_response_answers_its_input_and_is_stored_for_its_own_client(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    response, reply = await respond(server, {"model": "fake/chat", "input": "Capital of France?",
                                             "metadata": {"ticket": "7"}})
    assert response.code == 200
    assert reply["id"].startswith("resp_") and reply["object"] == "response" and reply["status"] == "completed"
    [message] = reply["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Paris.", "annotations": [], "logprobs": []}]
    assert reply["usage"] == {"input_tokens": len(ASKED), "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": len("Paris.<|im_end|>"),
                              "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": len(ASKED) + len("Paris.<|im_end|>")}
    assert reply["metadata"] == {"ticket": "7"} and reply["store"] is True
    assert fed_text(server.streams[0]).startswith(ASKED)

    fetched, stored = await respond(server, None, method="GET", path=f"/v1/responses/{reply['id']}")
    assert fetched.code == 200 and stored == reply
    deleted, answer = await respond(server, None, method="DELETE", path=f"/v1/responses/{reply['id']}")
    assert deleted.code == 200 and answer == {"id": reply["id"], "object": "response.deleted", "deleted": True}
    gone, error = await respond(server, None, method="GET", path=f"/v1/responses/{reply['id']}")
    assert gone.code == 404 and error["error"]["code"] == "not_found"
    await wait_for_no_sessions(server.manager)


async def test_a_stored_response_is_seen_by_no_other_key(serve_fakes, tmp_path):
    keys = add_keys(tmp_path / "keys.db", alice=KeyLimits(), bob=KeyLimits())
    server = await serve_fakes(reply=ANSWER, keys_db=tmp_path / "keys.db")
    _, reply = await respond(server, {"model": "fake/chat", "input": "Hi"}, headers=bearer(keys["alice"]))
    path = f"/v1/responses/{reply['id']}"
    assert (await respond(server, None, bearer(keys["bob"]), "GET", path))[0].code == 404
    assert (await respond(server, None, bearer(keys["bob"]), "DELETE", path))[0].code == 404
    continued, error = await respond(server, {"model": "fake/chat", "input": "More", "previous_response_id":
                                              reply["id"]}, headers=bearer(keys["bob"]))
    assert continued.code == 400 and error["error"]["param"] == "previous_response_id"
    assert (await respond(server, None, bearer(keys["alice"]), "GET", path))[0].code == 200


async def test_a_continued_response_feeds_the_conversation_without_the_earlier_instructions(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    _, first = await respond(server, {"model": "fake/chat", "input": "Capital of France?",
                                      "instructions": "Answer briefly."})
    response, second = await respond(server, {"model": "fake/chat", "previous_response_id": first["id"],
                                              "instructions": "Answer in French.",
                                              "input": [{"role": "user", "content": [
                                                  {"type": "input_text", "text": "And Germany?"}]}]})
    assert response.code == 200 and second["previous_response_id"] == first["id"]
    prompt = fed_text(server.streams[-1])[:second["usage"]["input_tokens"]]
    assert prompt == ("<|im_start|>system\nAnswer in French.<|im_end|>\n" + ASKED + "Paris.<|im_end|>\n"
                      "<|im_start|>user\nAnd Germany?<|im_end|>\n<|im_start|>assistant\n")
    # Not stored: nothing to continue.
    _, unstored = await respond(server, {"model": "fake/chat", "input": "Hi", "store": False})
    assert (await respond(server, None, method="GET", path=f"/v1/responses/{unstored['id']}"))[0].code == 404


async def test_a_stream_sends_the_typed_events_in_order(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    response = await server.fetch("/v1/responses", method="POST", body={
        "model": "fake/chat", "input": "Capital of France?", "stream": True})
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = typed_events(response.body)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    types = [event["type"] for event in events]
    deltas = [event["delta"] for event in events if event["type"] == "response.output_text.delta"]
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert "".join(deltas) == "Paris." and len(deltas) > 1
    created, completed = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert completed["id"] == created["id"] and completed["status"] == "completed"
    assert completed["output"] == [events[-2]["item"]] and completed["usage"]["output_tokens"] > 0
    fetched, stored = await respond(server, None, method="GET", path=f"/v1/responses/{completed['id']}")
    assert stored == completed


async def test_a_reply_cut_by_max_output_tokens_is_incomplete(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    _, reply = await respond(server, {"model": "fake/chat", "input": "Capital of France?", "max_output_tokens": 3})
    assert reply["status"] == "incomplete" and reply["incomplete_details"] == {"reason": "max_output_tokens"}
    assert reply["output"][0]["content"][0]["text"] == "Par" and reply["usage"]["output_tokens"] == 3
    response = await server.fetch("/v1/responses", method="POST", body={
        "model": "fake/chat", "input": "Capital of France?", "max_output_tokens": 3, "stream": True})
    assert typed_events(response.body)[-1]["type"] == "response.incomplete"


async def test_refusals_name_the_field_at_fault(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    for body, param in [
        ({"model": "fake/chat"}, "input"),
        ({"model": "fake/chat", "input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
        ({"model": "fake/chat", "input": "x", "tools": [{"type": "web_search_preview"}]}, "tools"),
        ({"model": "fake/chat", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
        ({"model": "fake/chat", "input": [{"type": "function_call", "name": "f"}]}, "input"),
        ({"model": "fake/chat", "input": "x", "background": True}, "background"),
        ({"model": "fake/chat", "input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"model": "fake/chat", "input": "x", "max_output_tokens": 100_000}, "max_output_tokens"),
        ({"model": "fake/chat", "input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text"),
    ]:
        response, error = await respond(server, body)
        assert response.code in (400, 404) and error["error"]["param"] == param, (body, error)
    assert (await respond(server, {"model": "no/such", "input": "x"}))[0].code == 404
    await wait_for_no_sessions(server.manager)


async def test_the_store_keeps_a_quarter_of_its_size_per_client(serve_fakes):
    server = await serve_fakes(reply="ok", stored_responses=4)
    ids = [(await respond(server, {"model": "fake/chat", "input": "Hi"}))[1]["id"] for _ in range(3)]
    assert [(await respond(server, None, method="GET", path=f"/v1/responses/{id_}"))[0].code
            for id_ in ids] == [404, 404, 200]


async def test_a_page_may_delete_a_stored_response_after_a_preflight(serve_fakes):
    server = await serve_fakes(reply="ok")
    preflight = await server.fetch("/v1/responses/resp_abc", method="OPTIONS", headers={
        "Origin": "https://page.example", "Access-Control-Request-Method": "DELETE"})
    assert preflight.code == 204 and preflight.headers["Access-Control-Allow-Methods"] == "GET, DELETE, OPTIONS"
    creating = await server.fetch("/v1/responses", method="OPTIONS", headers={
        "Origin": "https://page.example", "Access-Control-Request-Method": "POST"})
    assert "POST" in creating.headers["Access-Control-Allow-Methods"]
