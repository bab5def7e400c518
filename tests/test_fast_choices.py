"""Several choices (``n`` > 1) on fakes: the rows of one session (``tests.fakes.FakeRowsStream``,
row ``i`` answering its own text). The replies' shape, the stream's indices, the usage, the bound,
the seeds each row gets and that every session is closed. That the rows are real independent
samples, each what a request of one row would write, is proven on the swarm (test_openai_choices.py).
"""

import json

import pytest

from sessions.engine.row_stream import SEED_SPACE, row_seed
from tests.helpers import wait_for_no_sessions
from tests.test_fast_openai import CHATML_QUESTION, QUESTION, events, post

ROWS = ["Paris.<|im_end|>", "It is Paris, of course.<|im_end|>", "Lyon? No: Paris.<|im_end|>"]


def fed_text(tokens) -> str:
    return "".join(chr(token) for token in tokens)


async def test_a_chat_completion_of_three_choices_has_each_row_s_reply_at_its_index(serve_fakes):
    server = await serve_fakes(row_replies=ROWS)
    response, reply = await post(server, "/v1/chat/completions",
                                 {"model": "fake/chat", "messages": QUESTION, "n": 3, "max_tokens": 40})
    assert response.code == 200, reply
    assert reply["choices"] == [
        {"index": index, "message": {"role": "assistant", "content": text.removesuffix("<|im_end|>")},
         "logprobs": None, "finish_reason": "stop"} for index, text in enumerate(ROWS)]
    # The prompt is counted once; the completion tokens of every row.
    assert reply["usage"]["prompt_tokens"] == len(CHATML_QUESTION)
    assert reply["usage"]["completion_tokens"] == sum(len(text) for text in ROWS)
    await wait_for_no_sessions(server.manager)
    [stream] = server.streams
    assert stream.rows == 3 and stream.closed
    # Each row was fed the prompt, then its own tokens; a row that ended is fed its last token again.
    longest = max(len(text) for text in ROWS)
    for row, text in enumerate(ROWS):
        assert fed_text(stream.fed[row]) == CHATML_QUESTION + (text + text[-1] * longest)[:longest - 1]


async def test_each_row_stops_on_its_own_and_the_others_go_on(serve_fakes):
    server = await serve_fakes(row_replies=["abcdefghij", "xyz END and more", "abcEND"])
    response, reply = await post(server, "/v1/completions",
                                 {"model": "fake/chat", "prompt": "Go", "n": 3, "max_tokens": 8, "stop": "END"})
    assert [(choice["index"], choice["text"], choice["finish_reason"]) for choice in reply["choices"]] == [
        (0, "abcdefgh", "length"), (1, "xyz ", "stop"), (2, "abc", "stop")]
    assert reply["usage"]["completion_tokens"] == 8 + len("xyz END") + len("abcEND")
    await wait_for_no_sessions(server.manager)


async def test_a_streamed_reply_of_several_choices_tells_each_chunk_s_index(serve_fakes):
    server = await serve_fakes(row_replies=ROWS)
    response = await server.fetch("/v1/chat/completions", method="POST", body={
        "model": "fake/chat", "messages": QUESTION, "n": 3, "stream": True, "stream_options": {"include_usage": True}})
    assert response.code == 200
    *chunks, usage, done = events(response.body)
    assert done == "[DONE]" and len({chunk["id"] for chunk in chunks + [usage]}) == 1
    for index, text in enumerate(ROWS):
        choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"][0]["index"] == index]
        assert all(len(chunk["choices"]) == 1 for chunk in chunks)
        assert choices[0]["delta"]["role"] == "assistant" and all("role" not in choice["delta"]
                                                                  for choice in choices[1:])
        assert "".join(choice["delta"].get("content", "") for choice in choices) == text.removesuffix("<|im_end|>")
        assert [choice["finish_reason"] for choice in choices] == [None] * (len(choices) - 1) + ["stop"]
    # The rows' chunks come as the rows go, step by step: not one row after the other.
    assert [chunk["choices"][0]["index"] for chunk in chunks[:3]] == [0, 1, 2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == sum(len(text) for text in ROWS)
    assert usage["usage"]["prompt_tokens"] == len(CHATML_QUESTION)
    await wait_for_no_sessions(server.manager)


async def test_a_streamed_completion_of_several_choices(serve_fakes):
    server = await serve_fakes(row_replies=["abcdefgh", "xy"])
    response = await server.fetch("/v1/completions", method="POST", body={
        "model": "fake/chat", "prompt": "x", "n": 2, "max_tokens": 4, "stream": True})
    *chunks, done = events(response.body)
    assert done == "[DONE]" and all(chunk["object"] == "text_completion" for chunk in chunks)
    texts = ["".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"][0]["index"] == index)
             for index in range(2)]
    reasons = [[chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"][0]["index"] == index][-1]
               for index in range(2)]
    assert texts == ["abcd", "xy"] and reasons == ["length", "stop"]


async def test_with_a_seed_each_row_has_its_own_and_row_zero_the_request_s(serve_fakes):
    server = await serve_fakes()
    await post(server, "/v1/completions", {"model": "fake/chat", "prompt": "x", "n": 3, "seed": 7, "max_tokens": 2})
    await post(server, "/v1/completions", {"model": "fake/chat", "prompt": "x", "n": 2, "max_tokens": 2})
    assert [stream.seeds for stream in server.streams] == [[7, 8, 9], [None, None]]


def test_row_seeds_stay_within_what_a_request_may_give():
    assert [row_seed(SEED_SPACE - 2, row) for row in range(4)] == [SEED_SPACE - 2, SEED_SPACE - 1, 0, 1]
    assert row_seed(-(2 ** 63), 1) == -(2 ** 63) + 1 and row_seed(None, 3) is None


@pytest.mark.parametrize("n, status", [(0, 400), (-1, 400), (5, 400), ("two", 400), (4, 200)])
async def test_n_is_bounded_by_the_server_s_setting(serve_fakes, n, status):
    server = await serve_fakes(max_choices=4)
    response, reply = await post(server, "/v1/chat/completions",
                                 {"model": "fake/chat", "messages": QUESTION, "n": n, "max_tokens": 3})
    assert response.code == status, reply
    if status == 400:
        assert reply["error"]["param"] == "n" and server.opened == []
    else:
        assert len(reply["choices"]) == 4


async def test_rows_count_against_the_memory_budget_and_the_daily_tokens(serve_fakes, tmp_path):
    from sessions.accounts.store import KeyLimits
    from tests.helpers import add_keys, bearer

    keys = add_keys(tmp_path / "keys.db", carol=KeyLimits(daily_tokens=40))
    server = await serve_fakes(row_replies=["a" * 50], keys_db=tmp_path / "keys.db")
    prompt_tokens = len("Hi")
    response, reply = await post(server, "/v1/completions", {"model": "fake/chat", "prompt": "Hi", "n": 4,
                                                             "max_tokens": 20}, bearer(keys["carol"]))
    assert response.code == 200, reply
    # 38 tokens were left after the prompt: the rows shared them, each row cut short by the budget.
    assert reply["usage"]["completion_tokens"] == 40 - prompt_tokens
    assert [choice["finish_reason"] for choice in reply["choices"]] == ["length"] * 4
    assert sum(len(choice["text"]) for choice in reply["choices"]) == 40 - prompt_tokens
    assert server.streams[0].position == prompt_tokens + 9  # ten steps of four rows: none past the budget
    await wait_for_no_sessions(server.manager)
    response, reply = await post(server, "/v1/completions", {"model": "fake/chat", "prompt": "Hi", "n": 2,
                                                             "max_tokens": 2}, bearer(keys["carol"]))
    assert response.code == 429 and reply["error"]["code"] == "insufficient_quota"


async def test_a_session_of_rows_reserves_a_cache_per_row_and_is_never_kept_warm(serve_fakes):
    server = await serve_fakes(warm_sessions=4)
    reserved = []
    admit = server.manager.admission.admit
    server.manager.admission.admit = lambda client, reserved_bytes=0: reserved.append(reserved_bytes) or admit(
        client, reserved_bytes)
    response, reply = await post(server, "/v1/completions", {"model": "fake/chat", "prompt": "Hi", "n": 3,
                                                             "max_tokens": 5})
    assert response.code == 200, reply
    assert server.opened == [("fake/chat", len("Hi") + 5)]  # just long enough: no room kept for a next turn
    assert reserved == [3 * (len("Hi") + 5) * 4]  # rows x length x the fake's bytes per token
    await wait_for_no_sessions(server.manager)  # closed, not kept warm
    assert len(server.manager.warm) == 0 and server.streams[0].closed


async def test_a_client_that_leaves_mid_generation_leaves_no_session(serve_fakes):
    from tests.helpers import send_raw_post

    server = await serve_fakes(row_replies=["a" * 200], step_seconds=0.05)
    body = json.dumps({"model": "fake/chat", "prompt": "Hi", "n": 3, "max_tokens": 200, "stream": True})
    reader, writer = await send_raw_post(server.port, "/v1/completions", body.encode())
    await reader.readuntil(b"data: ")
    writer.close()
    await wait_for_no_sessions(server.manager)
    [stream] = server.streams
    assert stream.closed and len(stream.fed[0]) < 100  # stopped well before its end


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_step_that_fails_mid_generation_ends_the_reply_and_its_session(serve_fakes, monkeypatch, stream):
    from tests.fakes import FakeRowsStream

    step = FakeRowsStream.step

    def failing_step(self, new_input_ids, choosers):
        if self.position > 5:
            raise RuntimeError("the swarm broke")
        return step(self, new_input_ids, choosers)

    monkeypatch.setattr(FakeRowsStream, "step", failing_step)
    server = await serve_fakes(row_replies=["a" * 50])
    response = await server.fetch("/v1/completions", method="POST", body={
        "model": "fake/chat", "prompt": "Hi", "n": 2, "max_tokens": 20, "stream": stream})
    if stream:  # the chunks so far, then the error as an event
        *chunks, error, done = events(response.body)
        assert response.code == 200 and done == "[DONE]" and error["error"]["code"] == "internal_error"
        assert {chunk["choices"][0]["index"] for chunk in chunks} == {0, 1}
    else:
        assert response.code == 500 and json.loads(response.body)["error"]["code"] == "internal_error"
    await wait_for_no_sessions(server.manager)
    assert server.streams[0].closed
