"""Sessions that go back, on real swarm nodes: a step that starts at an earlier position computes
exactly what a fresh session fed the same tokens computes, on our nodes (in place) and on a
node that cannot roll back (its span is reopened and replays the history). Against such a node
a session drafts only tokens that are never taken back."""

import dataclasses
import json

import pytest
import torch

from config import Settings
from sessions.requests import GenerationRequest, SamplingParams
from sessions.serving.manager import build_manager
from swarm.local import LocalSwarm, SwarmModel, count_blocks
from swarm.petals_api import InferenceSession, route_rollback

FAMILY = "tests/tiny-qwen3"  # served by two nodes of the shared swarm, each with half of the blocks
TOKENS = [17, 305, 1201, 44, 9, 880, 2301, 16, 77, 1500, 312, 48, 5, 600, 7000, 21]


def hidden_states(client, session, token_ids) -> torch.Tensor:
    """The last block's outputs for ``token_ids``, fed as one step of ``session``."""
    with torch.inference_mode(), client.transformer.h.use_session(session):
        return client.transformer(input_ids=torch.tensor([token_ids])).last_hidden_state


def fresh_session(client, max_length: int = 64) -> InferenceSession:
    return InferenceSession(client.transformer.h.sequence_manager, max_length)


def step_after_rollback(client, keep: int, then: list) -> tuple:
    """Feeds TOKENS in two steps, goes back to ``keep`` tokens and feeds ``then``; returns that
    step's outputs, those of a fresh session fed the same, and the session (still open)."""
    session = fresh_session(client)
    hidden_states(client, session, TOKENS[:10])
    hidden_states(client, session, TOKENS[10:])
    route_rollback.roll_back(session, keep)
    assert session.position == keep
    after = hidden_states(client, session, then)
    reference_session = fresh_session(client)
    reference = hidden_states(client, reference_session, TOKENS[:keep] + then)[:, -len(then):]
    reference_session.close()
    return after, reference, session


async def test_a_step_may_start_at_any_earlier_position_on_our_nodes(manager, io_loop):
    client = manager.registry.find(FAMILY).client

    def run() -> None:
        for keep, then in ((12, [99, 98, 97]), (3, [5]), (16, [42]), (0, [1, 2, 3, 4])):
            after, reference, session = step_after_rollback(client, keep, then)
            assert len(session._server_sessions) == 2 and route_rollback.route_rolls_back(session)
            torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-4)
            if keep:  # the kept tokens count: without them the outputs differ
                without = fresh_session(client)
                assert not torch.allclose(after, hidden_states(client, without, then), atol=1e-3)
                without.close()
            # The span histories kept for failover are the rolled-back conversation's.
            assert all(span.history.shape[1] == keep + len(then) for span in session._server_sessions)
            session.close()

    await io_loop.run_in_executor(None, run)


async def test_going_back_past_the_start_or_forward_is_refused(manager, io_loop):
    client = manager.registry.find(FAMILY).client

    def run() -> None:
        session = fresh_session(client)
        hidden_states(client, session, TOKENS[:4])
        for position in (-1, 5):
            with pytest.raises(ValueError, match="cannot roll back"):
                route_rollback.roll_back(session, position)
        session.close()

    await io_loop.run_in_executor(None, run)


@pytest.fixture(scope="module")
def stock_node_swarm(tmp_path_factory, tiny_model_specs):
    """The tiny Llama on one node that serves steps as a stock petals 2.2 node does."""
    spec = dataclasses.replace(tiny_model_specs[0], dht_prefix="rollback-stock-llama")
    model = SwarmModel(str(spec.path), spec.swarm_prefix, count_blocks(str(spec.path)))
    with LocalSwarm(tmp_path_factory.mktemp("stock-node-logs"), threads=1) as swarm:
        swarm.add_node(model, extra_options=("--without-rollback",))
        swarm.wait_until_ready([model], timeout=240)
        yield swarm, spec


async def test_a_node_that_cannot_roll_back_is_found_out_and_replays_instead(stock_node_swarm, io_loop):
    swarm, spec = stock_node_swarm
    manager = build_manager([spec], swarm.initial_peers, "cpu", "float32",
                            settings=Settings(executor_workers=2, step_timeout=60, draft_tokens=16))
    await manager.start()
    try:
        client = manager.registry.find(spec.key).client

        def run() -> None:
            after, reference, session = step_after_rollback(client, 12, [99, 98, 97])
            assert not route_rollback.route_rolls_back(session)  # its record says nothing; asked, it says no
            torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-4)
            session.close()

        await io_loop.run_in_executor(None, run)
        # Speculation needs going back: against this node no draft is verified, and the text is
        # what plain decoding writes.
        request = GenerationRequest(inputs="one two three one two three one two", max_new_tokens=24)
        texts = []
        for speculative in (False, True):
            session = await manager.open_session(f"stock-{speculative}", spec.key, 128, "127.0.0.1")
            updates = [update async for update in session.generate(
                dataclasses.replace(request, speculative=speculative))]
            texts.append(updates[-1].outputs)
            await session.aclose("test done")
        assert texts[0] == texts[1] and len(texts[0]) > 10
        assert manager.metrics.drafted_tokens.labels(spec.key, "prompt_lookup")._value.get() == 0
        # Except tokens a JSON schema allows alone: they are never taken back, so any server takes them.
        schema = {"type": "object", "properties": {"a_rather_long_property_name": {"type": "boolean"}},
                  "required": ["a_rather_long_property_name"], "additionalProperties": False}
        constrained = GenerationRequest(inputs="x", max_new_tokens=30,
                                        sampling=SamplingParams(json_schema=json.dumps(schema)))
        texts = []
        for speculative in (False, True):
            session = await manager.open_session(f"stock-json-{speculative}", spec.key, 128, "127.0.0.1")
            updates = [update async for update in session.generate(
                dataclasses.replace(constrained, speculative=speculative, trace_route=True))]
            texts.append((updates[-1].outputs, updates[-1].route["steps"]))
            await session.aclose("test done")
        (plain, plain_steps), (drafted, drafted_steps) = texts
        assert drafted == plain and json.loads(plain.removesuffix(manager.registry.find(spec.key).tokenizer.eos_token))
        assert drafted_steps < plain_steps
        grammar = (manager.metrics.accepted_draft_tokens.labels(spec.key, "grammar")._value.get(),
                   manager.metrics.drafted_tokens.labels(spec.key, "grammar")._value.get())
        assert grammar[0] == grammar[1] > 0  # every one taken
    finally:
        await manager.close()
