"""The error taxonomy: petals and hivemind failures become stable codes with a retry flag."""

from pathlib import Path

import pytest
import tornado.web

import swarm.petals_api  # noqa: F401  # isort: skip  (the compatibility patch, before petals and hivemind)
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, P2PDaemonError, P2PHandlerError
from petals.client.routing.sequence_manager import MissingBlocksError

from handlers.base import as_service_error
from sessions.errors import (
    ERROR_CLASSES,
    BadRequest,
    CacheFull,
    ClientLimit,
    HTTPStatusError,
    MaxLengthExceeded,
    MissingBlocks,
    PeerFailure,
    SwarmError,
    UnknownModel,
    classify,
    describe_blocks,
    error_payload,
    from_petals_error,
)


@pytest.mark.parametrize("blocks, text", [([], ""), ([3], "3"), ([0, 1, 2, 5], "0-2, 5"), ([7, 2, 3], "2-3, 7")])
def test_describe_blocks(blocks, text):
    assert describe_blocks(blocks) == text


@pytest.mark.parametrize("petals_blocks, blocks", [([2, 3], [2, 3]), (0, [0]), ([5, 9, 6], [5, 6, 9])])
def test_missing_blocks_are_named(petals_blocks, blocks):
    error = from_petals_error(MissingBlocksError(petals_blocks), "org/model")
    assert isinstance(error, MissingBlocks) and error.blocks == blocks
    assert error.code == "missing_blocks" and error.retryable is True
    assert f"blocks {describe_blocks(blocks)} of org/model" in str(error)


def test_missing_blocks_survive_wrapping():
    wrapped = RuntimeError(f"Failed after 3 attempts: {MissingBlocksError([1, 2])!r}")
    assert from_petals_error(wrapped, "m").blocks == [1, 2]


@pytest.mark.parametrize("error, kind, code", [
    (P2PDaemonError("failed to connect to peer"), PeerFailure, "peer_failure"),
    (P2PHandlerError("stream reset"), PeerFailure, "peer_failure"),
    (TimeoutError(), PeerFailure, "peer_failure"),
    (ConnectionResetError("Connection lost"), PeerFailure, "peer_failure"),
    (ControlFailure("Connect failed. msg=failed to dial: all dials failed"), PeerFailure, "peer_failure"),
    (RuntimeError("Could not allocate 4096 tokens (AllocationFailed)"), CacheFull, "cache_full"),
    (ValueError("Maximum length exceeded: prefix 10 + current 5 exceeds pre-allocated maximum 12"),
     MaxLengthExceeded, "max_length_exceeded"),
    (RuntimeError("something else entirely"), SwarmError, "swarm_error"),
])
def test_petals_failures_map_to_codes(error, kind, code):
    mapped = from_petals_error(error, "m")
    assert type(mapped) is kind and mapped.code == code
    assert mapped.retryable is (code != "max_length_exceeded")


API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
# The web framework's own refusals a client meets, as the handlers report them (code ``http_`` and
# the status), with their line in the table: sessions/errors.py declares no meaning for them.
FRAMEWORK_REFUSALS = {
    404: "no such path",
    405: "the path does not take this method, e.g. `GET /api/v1/generate`",
}


def framework_refusal(status: int) -> HTTPStatusError:
    """The error a handler answers for Tornado's own refusal with ``status``."""
    return as_service_error(tornado.web.HTTPError(status), status, "")


def table_row(error, meaning: str) -> str:
    return (f"| `{error.code}` | {error.status} | {'yes' if error.retryable else 'no'} | "
            f"{'kept' if error.session_survives else 'closed'} | {meaning} |")


def markdown_error_table() -> str:
    """The documented error table, as the error classes declare it, then the framework's refusals."""
    rows = ["| code | HTTP | retryable | session | meaning |", "|---|---|---|---|---|"]
    rows += [table_row(error, error.meaning) for error in ERROR_CLASSES]
    rows += [table_row(framework_refusal(status), meaning) for status, meaning in FRAMEWORK_REFUSALS.items()]
    return "\n".join(rows)


def test_documented_error_table_is_the_declared_one():
    expected = markdown_error_table()
    assert expected in API_DOC.read_text(), \
        f"docs/api.md's error table differs from sessions/errors.py; it should read:\n{expected}"


@pytest.mark.parametrize("status", sorted(FRAMEWORK_REFUSALS))
def test_framework_refusals_carry_their_status_as_code(status):
    error = framework_refusal(status)
    assert (error.code, error.status, error.retryable) == (f"http_{status}", status, False)
    assert error_payload(error)["code"] == f"http_{status}"


def test_every_code_is_declared_once():
    codes = [error.code for error in ERROR_CLASSES]
    assert len(codes) == len(set(codes)) and "bad_request" in codes and "internal_error" in codes


@pytest.mark.parametrize("error", [BadRequest("max_length must be an integer", param="max_length"),
                                   UnknownModel("nope", ["a/b"]), ClientLimit("too many"), CacheFull("full")])
def test_one_payload_per_api(error):
    native = error_payload(error)
    assert native == {"ok": False, "traceback": str(error), "code": error.code, "retryable": error.retryable}
    openai = error_payload(error, "openai")["error"]
    assert openai["message"] == str(error) and openai["type"] == error.openai_type
    assert openai["param"] == error.param and openai["code"] == (error.openai_code or error.code)


def test_unexpected_errors_hide_their_details_unless_debugging():
    try:
        raise KeyError("secret detail")
    except KeyError as error:
        hidden, debug = error_payload(error), error_payload(error, debug=True)
    assert hidden == {"ok": False, "traceback": "Internal error: KeyError", "code": "internal_error",
                      "retryable": False}
    assert "secret detail" not in hidden["traceback"] and "secret detail" in debug["traceback"]
    assert classify(ValueError("x")).status == 500
