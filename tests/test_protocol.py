"""Parsing of WebSocket messages and generation parameters (pure logic)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from handlers.protocol import (
    CancelMessage,
    GenerateMessage,
    OpenSessionMessage,
    decode_frame,
    generation_request,
    parse_message,
    request_id,
)
from sessions.errors import BadRequest, InvalidRequest, log_error

LIMIT = 10_000
REPO_ROOT = Path(__file__).resolve().parent.parent


def read(raw, limit=LIMIT):
    """A frame as the connection reads it."""
    return parse_message(decode_frame(raw, limit))


def test_open_message():
    message = read(json.dumps({"type": "open_inference_session", "max_length": 1024}), LIMIT)
    assert message == OpenSessionMessage(model=None, max_length=1024)


def test_generate_message_with_every_field():
    raw = json.dumps({"type": "generate", "inputs": "A cat", "max_new_tokens": 3, "do_sample": 1,
                      "temperature": 0.6, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1,
                      "stop_sequence": "###", "extra_stop_sequences": ["</s>"]})
    request = read(raw, LIMIT).request
    assert request.inputs == "A cat" and request.max_new_tokens == 3 and request.max_length is None
    assert request.sampling.do_sample is True and request.sampling.temperature == 0.6
    assert request.sampling.top_k == 40 and request.sampling.top_p == 0.9
    assert request.sampling.repetition_penalty == 1.1
    assert request.stop_sequence == "###" and request.extra_stop_sequences == ("</s>",)


def test_stop_message():
    assert read('{"type": "stop"}', LIMIT) == CancelMessage()


@pytest.mark.parametrize("value, expected", [(0, False), (1, True), ("0", False), ("1", True), ("true", True),
                                             ("False", False), (True, True), (None, False)])
def test_do_sample_accepts_numbers_words_and_booleans(value, expected):
    params = {"max_new_tokens": 1, "do_sample": value}
    assert generation_request(params).sampling.do_sample is expected


def test_form_strings_are_numbers():
    request = generation_request({"max_new_tokens": "20", "temperature": "0.5", "top_k": "0"})
    assert request.max_new_tokens == 20 and request.sampling.temperature == 0.5 and request.sampling.top_k is None  # 0: off


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, "max_length or max_new_tokens"),
        ({"max_new_tokens": True}, "must be an integer"),
        ({"max_new_tokens": 1.5}, "must be an integer"),
        ({"max_length": -1}, "at least 1"),
        ({"max_new_tokens": 1, "temperature": 2.5}, "temperature"),
        ({"max_new_tokens": 1, "temperature": "hot"}, "temperature must be a number"),
        ({"max_new_tokens": 1, "top_p": 0}, "top_p"),
        ({"max_new_tokens": 1, "top_k": -2}, "top_k"),
        ({"max_new_tokens": 1, "repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"max_new_tokens": 1, "extra_stop_sequences": [""]}, "non-empty strings"),
        ({"max_new_tokens": 1, "stop_sequence": ""}, "must not be empty"),
        ({"max_new_tokens": "\u00b2"}, "must be an integer"),  # a digit to str.isdigit, not to int()
        ({"max_new_tokens": "9" * 5000}, "must be an integer"),  # more digits than int() converts
    ],
)
def test_bad_parameters_name_the_field(params, expected):
    with pytest.raises(BadRequest, match=expected):
        generation_request(params)


def test_oversized_message_is_refused_before_parsing():
    with pytest.raises(BadRequest, match="too large"):
        read("{" + " " * LIMIT + "}", LIMIT)


def test_deeply_nested_json_is_a_bad_request():
    with pytest.raises(BadRequest, match="RecursionError"):
        read('{"type": ' + "[" * 100_000 + "]" * 100_000 + "}", 1_000_000)


def test_generate_message_type():
    assert isinstance(read('{"type": "generate", "max_length": 4}', LIMIT), GenerateMessage)


def test_parsing_messages_imports_neither_torch_nor_petals():
    """The wire's request types live apart from the modules that drive the swarm."""
    code = ("import sys, handlers.protocol, handlers.openai_protocol; "
            "print(sorted(name for name in ('torch', 'petals', 'transformers') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_an_error_quotes_only_the_start_of_a_huge_value():
    with pytest.raises(BadRequest) as refused:
        generation_request({"max_new_tokens": "9" * 5000})
    assert len(str(refused.value)) < 200 and "(5002 characters)" in str(refused.value)


def test_a_logged_error_is_cut_short():
    logged = []

    class Recorder(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    log = logging.getLogger("test-cut-short")
    log.setLevel(logging.DEBUG)
    log.addHandler(Recorder())
    log_error(log, "context", InvalidRequest("x" * 100_000))
    assert len(logged[0]) < 600 and logged[0].endswith("(100000 characters)")


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", ["inf", "Infinity", "-inf", "nan", "1e999", float("inf"), float("-inf"),
                                   float("nan"), 10 ** 400])
def test_a_number_that_is_not_finite_is_refused_by_name(field, value):
    """Form strings and JSON numbers alike: float() reads "inf", "nan" and "1e999" (infinite)."""
    with pytest.raises(BadRequest, match=f"^{field} must be a finite number"):
        generation_request({"max_new_tokens": 1, field: value})


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_a_generate_message_with_a_json_number_that_is_not_finite_is_refused(literal):
    """Python's JSON parser reads these (the last as infinity)."""
    raw = '{"type": "generate", "inputs": "Hi", "max_new_tokens": 1, "temperature": %s}' % literal
    with pytest.raises(BadRequest, match="^temperature must be a finite number"):
        read(raw, LIMIT)


@pytest.mark.parametrize("given, expected", [("a-1", "a-1"), (7, 7), (None, None), (-(2 ** 53 - 1), -(2 ** 53 - 1))])
def test_a_request_id_is_a_short_string_or_an_exact_integer(given, expected):
    assert request_id({"type": "stop", "id": given}) == expected


@pytest.mark.parametrize("given", ["x" * 129, 2 ** 53, 1.5, True, [1], {"a": 1}])
def test_other_request_ids_are_refused(given):
    with pytest.raises(BadRequest, match="id must be"):
        request_id({"type": "stop", "id": given})


@pytest.mark.parametrize("field, value", [("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5),
                                          ("top_k", -2), ("repetition_penalty", 0), ("repetition_penalty", 11)])
def test_every_api_refuses_the_same_values(field, value):
    from handlers.openai_protocol import ChatCompletionRequest

    with pytest.raises(BadRequest, match=field):
        generation_request({"max_new_tokens": 1, field: value})
    with pytest.raises(BadRequest, match=field):
        ChatCompletionRequest.parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value})


@pytest.mark.parametrize("field, value", [("temperature", 0), ("temperature", 2), ("top_p", 1), ("top_k", -1),
                                          ("repetition_penalty", 10)])
def test_every_api_accepts_the_same_values(field, value):
    from handlers.openai_protocol import ChatCompletionRequest

    generation_request({"max_new_tokens": 1, field: value})
    ChatCompletionRequest.parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value})


def test_temperature_zero_is_greedy_on_every_api():
    from handlers.openai_protocol import ChatCompletionRequest

    assert generation_request({"max_new_tokens": 1, "do_sample": 1, "temperature": 0}).sampling.greedy
    chat = ChatCompletionRequest.parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert chat.sampling_params().greedy
