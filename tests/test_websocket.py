"""The WebSocket API against the real local swarm."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import wait_for_no_sessions
from tests.ws_client import WSClient

DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tests/tiny-llama"
QUESTION = "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n"
FOLLOW_UP = "\n<|im_start|>user\nAnd the capital of Germany? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n"


def local_greedy_turns(path, tokenizer, turns, stop_text: str, limit: int = 60) -> list:
    """Plain transformers' greedy replies to each turn in turn, each up to and including ``stop_text``.

    Works on token ids, as the server does: each reply's own tokens stay in the context (and in
    the model's key-value cache, so each token costs one short forward pass).
    """
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    past, pending, replies = None, [], []
    with torch.inference_mode():
        for turn in turns:
            pending += tokenizer(turn, add_special_tokens=False)["input_ids"]
            reply_ids = []
            while True:
                output = model(torch.tensor([pending]), past_key_values=past, use_cache=True)
                past = output.past_key_values
                token = int(output.logits[0, -1].argmax())
                pending = [token]
                reply_ids.append(token)
                text = tokenizer.decode(reply_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                if stop_text in text or len(reply_ids) >= limit:
                    break
            replies.append(text)
    return replies


async def test_spec_javascript_example(ws_port, manager):
    client = await WSClient.connect(ws_port)
    prompt, max_length = "A cat sat on", 30
    assert await client.request({"type": "open_inference_session", "model": DEFAULT, "max_length": max_length}) == {
        "ok": True}
    reply = await client.request({"type": "generate", "inputs": prompt, "max_length": max_length, "do_sample": 1,
                                  "temperature": 0.6, "top_p": 0.9})
    assert reply["ok"] is True and reply["stop"] is True
    assert isinstance(reply["outputs"], str) and reply["outputs"]
    prompt_tokens = len(manager.registry.find(DEFAULT).tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= reply["token_count"] <= max_length - prompt_tokens
    client.close()
    await wait_for_no_sessions(manager)


async def test_streams_one_token_per_message_and_continues_the_session(ws_port, manager):
    loaded = manager.registry.find(DEFAULT)
    client = await WSClient.connect(ws_port)
    assert (await client.request({"type": "open_inference_session", "model": "smollm2", "max_length": 512}))["ok"]
    first = await client.stream({"type": "generate", "inputs": QUESTION, "max_new_tokens": 1,
                                 "stop_sequence": "<|im_end|>"})
    assert all(reply["ok"] and reply["token_count"] == 1 for reply in first)
    assert [reply["stop"] for reply in first] == [False] * (len(first) - 1) + [True]
    answer = "".join(reply["outputs"] for reply in first)
    expected_answer, expected_follow_up = local_greedy_turns(loaded.spec.path, loaded.tokenizer,
                                                             [QUESTION, FOLLOW_UP], "<|im_end|>")
    assert answer == expected_answer
    assert "Paris" in answer and len(first) > 5

    second = await client.stream({"type": "generate", "inputs": FOLLOW_UP, "max_new_tokens": 1,
                                  "stop_sequence": "<|im_end|>"})
    follow_up = "".join(reply["outputs"] for reply in second)
    assert follow_up == expected_follow_up
    assert "Berlin" in follow_up
    client.close()


async def test_without_stop_sequence_one_reply(ws_port, manager):
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 64})
    reply = await client.request({"type": "generate", "inputs": "A cat in French is \"", "max_new_tokens": 3})
    assert reply["ok"] and reply["stop"] is True and reply["token_count"] == 3
    client.close()


async def test_multibyte_text_is_never_split(ws_port, manager):
    """A random model emits byte-level pieces of characters: none may reach the client half-done."""
    from sessions.engine.token_stream import TokenStream

    loaded = manager.registry.find(TINY)
    prompt = "日本語 🦀 café"
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 128})
    replies = await client.stream({"type": "generate", "inputs": prompt, "max_new_tokens": 1,
                                   "stop_sequence": "never-appears", "max_length": 80})
    client.close()
    assert all("\ufffd" not in reply["outputs"] for reply in replies)
    stream = TokenStream(loaded, 128)
    try:
        prompt_ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = stream.step(prompt_ids) + [token for _ in range(sum(r["token_count"] for r in replies) - 1)
                                        for token in stream.step()]
    finally:
        stream.close()
    expected = loaded.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert "".join(reply["outputs"] for reply in replies) == expected.rstrip("\ufffd")


async def test_disconnect_mid_stream_closes_the_session(ws_port, manager):
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 512})
    await client.send({"type": "generate", "inputs": "Once upon a time", "max_new_tokens": 1,
                       "stop_sequence": "never-appears"})
    for _ in range(3):
        assert (await client.receive())["stop"] is False
    assert manager.open_session_count == 1
    client.close()
    seconds = await wait_for_no_sessions(manager, timeout=10)
    assert seconds < 10
    assert not [task for task in manager.task_names if task.startswith("generate-")]


async def test_stop_message_ends_the_stream_and_the_session_goes_on(ws_port, manager):
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 512})
    await client.send({"type": "generate", "inputs": "Once upon a time", "max_new_tokens": 1,
                       "stop_sequence": "never-appears"})
    assert (await client.receive())["stop"] is False
    await client.send({"type": "stop"})
    replies = []
    while not replies or not replies[-1]["stop"]:
        replies.append(await client.receive())
    assert len(replies) <= 3  # the stop lands before the next step or the one after
    reply = await client.request({"type": "generate", "inputs": " and then", "max_new_tokens": 2})
    assert reply["ok"] and reply["stop"] and reply["token_count"] == 2
    assert (await client.request({"type": "stop"})) == {"ok": True, "outputs": "", "stop": True, "token_count": 0}
    client.close()


async def test_extra_stop_sequence_ends_the_turn(ws_port, manager):
    loaded = manager.registry.find(DEFAULT)
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": DEFAULT, "max_length": 512})
    replies = await client.stream({"type": "generate", "inputs": QUESTION, "max_new_tokens": 1,
                                   "stop_sequence": "<|im_end|>", "extra_stop_sequences": [" France"]})
    text = "".join(reply["outputs"] for reply in replies)
    assert replies[-1]["stop"] and " France" in text and "<|im_end|>" not in text
    assert [text] == local_greedy_turns(loaded.spec.path, loaded.tokenizer, [QUESTION], " France")
    client.close()


async def test_maximum_length_exceeded_keeps_the_connection(ws_port, manager):
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 8})
    reply = await client.request({"type": "generate", "inputs": "one two three four five six seven eight nine",
                                  "max_new_tokens": 1})
    assert reply["ok"] is False and "Maximum length exceeded" in reply["traceback"]
    reply = await client.request({"type": "generate", "inputs": "one", "max_new_tokens": 1})
    assert reply["ok"] is True
    client.close()


OPEN_TINY = {"type": "open_inference_session", "model": TINY, "max_length": 64}


@pytest.mark.parametrize(
    "before, message, expected",
    [
        ([], "{not json", "not valid JSON"),
        ([], "[1, 2]", "JSON object"),
        ([], {"type": "dance"}, "Unknown message type"),
        ([], {"max_length": 5}, "Unknown message type"),
        ([], {"type": "generate", "inputs": "hi", "max_new_tokens": 1}, "Open an inference session first"),
        ([OPEN_TINY], OPEN_TINY, "already open"),
        ([], {"type": "open_inference_session", "model": "no/such-model", "max_length": 64}, "Unknown model"),
        ([], {"type": "open_inference_session", "model": TINY}, "max_length is required"),
        ([], {"type": "open_inference_session", "model": TINY, "max_length": "lots"}, "max_length must be an integer"),
        ([], {"type": "open_inference_session", "model": TINY, "max_length": 0}, "max_length must be at least 1"),
        ([], {"type": "open_inference_session", "model": TINY, "max_length": -3}, "max_length must be at least 1"),
        ([], {"type": "open_inference_session", "model": TINY, "max_length": 100000}, "maximum session length"),
        ([], {"type": "open_inference_session", "model": 7, "max_length": 64}, "model must be a string"),
        ([OPEN_TINY], {"type": "generate", "inputs": "hi"}, "max_length or max_new_tokens"),
        ([OPEN_TINY], {"type": "generate", "inputs": "hi", "max_new_tokens": 0}, "at least 1"),
        ([OPEN_TINY], {"type": "generate", "inputs": 5, "max_new_tokens": 1}, "inputs must be a string"),
        ([OPEN_TINY], {"type": "generate", "inputs": "hi", "max_new_tokens": 1, "do_sample": "maybe"}, "do_sample"),
        ([OPEN_TINY], {"type": "generate", "inputs": "hi", "max_new_tokens": 1, "temperature": -1}, "temperature"),
        ([OPEN_TINY], {"type": "generate", "inputs": "hi", "max_new_tokens": 1, "top_p": 2}, "top_p"),
        ([OPEN_TINY], {"type": "generate", "inputs": "hi", "max_new_tokens": 1, "stop_sequence": 3}, "stop_sequence"),
        ([OPEN_TINY], {"type": "generate", "max_new_tokens": 1}, "inputs are required"),
        ([OPEN_TINY], {"type": "generate", "inputs": "hi", "max_new_tokens": 1, "extra_stop_sequences": ["x"]},
         "need a stop_sequence"),
        ([OPEN_TINY], {"type": "generate", "inputs": "hi", "max_new_tokens": 1, "stop_sequence": "two words here",
                       "extra_stop_sequences": ["x"]}, "exactly one token"),
        ([], json.dumps({"type": "generate", "inputs": "x" * 300_000}), "Message too large"),
    ],
)
async def test_protocol_errors_get_a_clear_reply(ws_port, manager, before, message, expected):
    client = await WSClient.connect(ws_port)
    for setup in before:
        assert (await client.request(setup))["ok"]
    reply = await client.request(message)
    assert reply["ok"] is False
    assert expected in reply["traceback"]
    assert "File \"" not in reply["traceback"] and "/work" not in reply["traceback"]
    assert isinstance(reply["code"], str) and isinstance(reply["retryable"], bool)
    # The connection is still usable.
    if before:
        follow = await client.request({"type": "generate", "inputs": "hi", "max_new_tokens": 1})
    else:
        follow = await client.request(OPEN_TINY)
    assert follow["ok"] is True
    client.close()
    await wait_for_no_sessions(manager)


async def test_message_over_the_hard_limit_closes_the_socket(ws_port, settings):
    client = await WSClient.connect(ws_port)
    await client.send("x" * (settings.max_message_bytes * 5))
    assert await client.receive() is None
    assert client.connection.close_code == 1009


async def test_private_model_is_served_to_its_own_page_only(ws_port, manager):
    request = {"type": "open_inference_session", "model": "tests/tiny-bloom", "max_length": 32}
    other_page = await WSClient.connect(ws_port, origin="https://elsewhere.example")
    reply = await other_page.request(request)
    assert reply["ok"] is False and "own chat page" in reply["traceback"]
    other_page.close()
    own_page = await WSClient.connect(ws_port, origin=f"http://127.0.0.1:{ws_port}")
    assert (await own_page.request(request))["ok"] is True
    own_page.close()
    await wait_for_no_sessions(manager)


async def test_a_long_stream_does_not_starve_a_short_one(ws_port, manager):
    long_client = await WSClient.connect(ws_port)
    short_client = await WSClient.connect(ws_port)
    await long_client.request({"type": "open_inference_session", "model": TINY, "max_length": 512})
    await short_client.request({"type": "open_inference_session", "model": TINY, "max_length": 64})
    await long_client.send({"type": "generate", "inputs": "Once upon a time", "max_new_tokens": 1,
                            "stop_sequence": "never-appears", "max_length": 400})
    assert (await long_client.receive())["stop"] is False
    short = await short_client.stream({"type": "generate", "inputs": "Hi", "max_new_tokens": 1,
                                       "stop_sequence": "never-appears", "max_length": 12})
    prompt_tokens = len(manager.registry.find(TINY).tokenizer("Hi", add_special_tokens=False)["input_ids"])
    assert short[-1]["stop"] and sum(reply["token_count"] for reply in short) == 12 - prompt_tokens
    # The long stream is still going: the short one was served between its steps.
    assert (await long_client.receive())["stop"] is False
    long_client.close()
    short_client.close()
    await wait_for_no_sessions(manager)


async def test_inputs_that_leave_no_room_are_refused_and_the_session_goes_on(ws_port, manager):
    loaded = manager.registry.find(TINY)
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 64})
    prompt = "one two three four"
    refused = await client.request({"type": "generate", "inputs": prompt,
                                    "max_length": len(loaded.encode(prompt)), "max_new_tokens": 1})
    assert refused["ok"] is False and refused["code"] == "max_length_exceeded"
    # Nothing was fed: the same request with room for three tokens decodes as a fresh session would.
    replies = await client.stream({"type": "generate", "inputs": prompt, "max_new_tokens": 3})
    client.close()
    fresh = await WSClient.connect(ws_port)
    await fresh.request({"type": "open_inference_session", "model": TINY, "max_length": 64})
    assert replies == await fresh.stream({"type": "generate", "inputs": prompt, "max_new_tokens": 3})
    fresh.close()


async def test_a_flood_of_generates_is_bounded_per_session(ws_port, manager):
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 512})
    for _ in range(12):  # streams that run until stopped: none ends during the flood
        await client.send({"type": "generate", "inputs": "Hi", "max_new_tokens": 1, "stop_sequence": "never-appears"})
    refused, finished = [], 0
    while len(refused) < 12 - 5:
        reply = await client.receive()
        if not reply["ok"]:
            refused.append(reply)
    assert {reply["code"] for reply in refused} == {"queue_full"} and all(reply["retryable"] for reply in refused)
    await client.send({"type": "stop"})
    while finished < 5:  # one running and four waiting, each ends with its final reply
        reply = await client.receive()
        assert reply["ok"], reply
        finished += reply["stop"]
    assert (await client.request({"type": "generate", "inputs": "Hi", "max_new_tokens": 1}))["ok"]
    client.close()


async def test_too_many_stop_sequences_are_refused(ws_port):
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 64})
    reply = await client.request({"type": "generate", "inputs": "Hi", "max_new_tokens": 1, "stop_sequence": "x",
                                  "extra_stop_sequences": [f"stop {index}" for index in range(20)]})
    assert reply["ok"] is False and reply["code"] == "invalid_request" and "stop sequences" in reply["traceback"]
    reply = await client.request({"type": "generate", "inputs": "Hi", "max_new_tokens": 1,
                                  "stop_sequence": "x" * 5000})
    assert reply["ok"] is False and reply["code"] == "invalid_request"
    client.close()


async def test_a_vanishing_temperature_samples_greedily(ws_port):
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 64})
    sampled = await client.request({"type": "generate", "inputs": "Hi", "max_new_tokens": 4, "do_sample": 1,
                                    "temperature": 1e-40})
    client.close()
    greedy_client = await WSClient.connect(ws_port)
    await greedy_client.request({"type": "open_inference_session", "model": TINY, "max_length": 64})
    greedy = await greedy_client.request({"type": "generate", "inputs": "Hi", "max_new_tokens": 4})
    greedy_client.close()
    assert sampled["ok"] is True and sampled == greedy


async def test_inputs_longer_than_the_session_can_hold_are_refused_before_tokenizing(ws_port, manager):
    loaded = manager.registry.find(TINY)
    client = await WSClient.connect(ws_port)
    await client.request({"type": "open_inference_session", "model": TINY, "max_length": 8})
    reply = await client.request({"type": "generate", "inputs": "x" * (8 * loaded.max_token_chars + 1),
                                  "max_new_tokens": 1})
    assert reply["ok"] is False and reply["code"] == "max_length_exceeded" and "characters" in reply["traceback"]
    client.close()


async def test_a_generation_asked_to_trace_its_route_names_the_server_that_served_it(ws_port, manager, http_client):
    swarm = json.loads((await http_client.fetch(f"http://127.0.0.1:{ws_port}/api/v1/swarm")).body)
    (tiny,) = [model for model in swarm["models"] if model["model"] == TINY]
    (server,) = tiny["servers"]
    client = await WSClient.connect(ws_port)
    assert (await client.request({"type": "open_inference_session", "model": TINY, "max_length": 64}))["ok"]
    untraced = await client.request({"type": "generate", "inputs": "A cat", "max_new_tokens": 3})
    assert "route" not in untraced  # only when asked: the original protocol is unchanged
    replies = await client.stream({"type": "generate", "inputs": " sat", "max_new_tokens": 1, "stop_sequence": "zzz",
                                   "max_length": 12, "trace_route": True})
    assert all("route" not in reply for reply in replies[:-1])
    route = replies[-1]["route"]
    assert route["steps"] == sum(reply["token_count"] for reply in replies) and route["failures"] == 0
    assert [(span["peer_id"], span["blocks"]) for span in route["spans"]] == [
        (server["peer_id"], [0, tiny["num_blocks"]])]
    assert 0 < route["spans"][0]["ms_per_step"] <= route["ms_per_step"]
    assert 0 < route["spans"][0]["share"] <= 1
    client.close()

    swarm = json.loads((await http_client.fetch(f"http://127.0.0.1:{ws_port}/api/v1/swarm")).body)
    latency = {entry["peer_id"]: entry for entry in swarm["server_latency"]}
    assert latency[server["peer_id"]]["recent_steps"] >= route["steps"]
    metrics = (await http_client.fetch(f"http://127.0.0.1:{ws_port}/metrics")).body.decode()
    assert f'swarm_chat_server_step_seconds_count{{server="{server["peer_id"]}"}}' in metrics
    await wait_for_no_sessions(manager)


async def test_replies_echo_the_id_of_the_request_they_answer(ws_port, manager):
    """A refusal that comes while a stream runs names the request it answers; the stream's
    replies name theirs; a request without an id gets replies without one."""
    client = await WSClient.connect(ws_port)
    try:
        opened = await client.request({"type": "open_inference_session", "model": TINY, "max_length": 256,
                                       "id": "open-1"})
        assert opened == {"ok": True, "id": "open-1"}
        await client.send({"type": "generate", "inputs": "A cat", "max_new_tokens": 1, "max_length": 24, "id": 7,
                           "stop_sequence": "never written"})
        await client.send({"type": "generate", "inputs": "x", "max_new_tokens": 1, "temperature": 9, "id": "bad"})
        replies = []
        while not replies or not replies[-1].get("stop"):
            replies.append(await client.receive())
        refusals = [reply for reply in replies if not reply["ok"]]
        streamed = [reply for reply in replies if reply["ok"]]
        assert [(refusal["id"], refusal["code"]) for refusal in refusals] == [("bad", "bad_request")]
        assert len(streamed) > 1 and {reply["id"] for reply in streamed} == {7}
        assert "temperature" in refusals[0]["traceback"]
        nothing_running = await client.request({"type": "stop", "id": "stop-1"})
        assert nothing_running == {"ok": True, "outputs": "", "stop": True, "token_count": 0, "id": "stop-1"}
        unnamed = await client.stream({"type": "generate", "inputs": "A dog", "max_new_tokens": 2})
        assert unnamed[-1]["stop"] and not any("id" in reply for reply in unnamed)
    finally:
        client.close()
    await wait_for_no_sessions(manager)
