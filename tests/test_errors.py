"""The error taxonomy: petals and hivemind failures become stable codes with a retry flag."""

import pytest

import swarm.petals_api  # noqa: F401  (the compatibility patch, before petals)
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, P2PDaemonError, P2PHandlerError
from petals.client.routing.sequence_manager import MissingBlocksError

from sessions.errors import (
    CacheFull,
    MaxLengthExceeded,
    MissingBlocks,
    PeerFailure,
    SwarmError,
    describe_blocks,
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
