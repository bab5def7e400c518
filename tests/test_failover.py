"""Failover that must not change the text: a session's only server dies, and two servers that
each hold half of its blocks take over. The default model (SmolLM2) must then write exactly what
an uninterrupted greedy run of plain transformers writes, token for token, although the session
went back a few tokens just before (the takeover replays the conversation as it then stands)."""

import asyncio
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from config import Settings
from model_specs import default_model
from sessions.requests import GenerationRequest
from sessions.serving.manager import build_manager
from swarm.blocks import lookup_blocks
from swarm.local import LocalSwarm, SwarmModel, count_blocks

PREFIX = "failover-smollm2"
PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
BEFORE, AFTER = 6, 16  # tokens generated before and after the crash
TAKEN_BACK = 3  # tokens generated after BEFORE, then taken back
NODE_OPTIONS = ("--update-period", "2", "--expiration", "5")
READY_TIMEOUT = 240


def reference_tokens(path, prompt_ids, count: int) -> list:
    """Greedy tokens of plain transformers, uninterrupted."""
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=count, do_sample=False)
    return output[0, len(prompt_ids):].tolist()


def online_servers(swarm: LocalSwarm, model: SwarmModel) -> list:
    """Per block, the peer ids of its online servers."""
    uids = [f"{model.dht_prefix}.{index}" for index in range(model.num_blocks)]
    return [{str(peer_id) for peer_id, info in block.servers.items() if info.state.name == "ONLINE"}
            for block in lookup_blocks(swarm.dht, uids)]


def servers_per_block(swarm: LocalSwarm, model: SwarmModel) -> list:
    return [len(servers) for servers in online_servers(swarm, model)]


async def wait_until(condition, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await loop.run_in_executor(None, condition):
        assert loop.time() < deadline, "the swarm did not reach the expected state"
        await asyncio.sleep(0.5)


@pytest.fixture
def failover_swarm(tmp_path, default_model_dir):
    with LocalSwarm(tmp_path / "logs", threads=1) as swarm:
        yield swarm


async def test_two_servers_take_over_one_and_the_text_does_not_change(failover_swarm, default_model_dir,
                                                                       models_dir):
    swarm = failover_swarm
    model = SwarmModel(str(default_model_dir), PREFIX, count_blocks(str(default_model_dir)))
    whole = swarm.add_node(model, extra_options=NODE_OPTIONS)
    await wait_until(lambda: min(servers_per_block(swarm, model)) == 1, READY_TIMEOUT)
    spec = dataclasses.replace(default_model(models_dir), dht_prefix=PREFIX)
    manager = build_manager([spec], swarm.initial_peers, "cpu", "float32",
                            settings=Settings(executor_workers=2, step_timeout=120, request_timeout=5, routing_update_period=2))
    await manager.start()
    try:
        loaded = manager.registry.find(None)
        expected = loaded.tokenizer.decode(reference_tokens(default_model_dir, loaded.encode(PROMPT), BEFORE + AFTER))
        session = await manager.open_session("failover", spec.key, 256, "127.0.0.1")
        before = [update async for update in session.generate(
            GenerationRequest(inputs=PROMPT, max_new_tokens=BEFORE, trace_route=True))]
        (whole_peer,) = online_servers(swarm, model)[0]
        assert [(span["peer_id"], span["blocks"]) for span in before[-1].route["spans"]] == [
            (whole_peer, [0, model.num_blocks])]
        assert before[-1].route["steps"] == BEFORE and before[-1].route["failures"] == 0
        kept = before[-1].session_length
        taken_back = [update async for update in session.generate(GenerationRequest(max_new_tokens=TAKEN_BACK))]
        assert taken_back[-1].session_length == kept + TAKEN_BACK
        # Back to where BEFORE ended, and on by one token: the server's caches and the history
        # petals keeps for failover both hold the conversation without the tokens taken back.
        resumed = [update async for update in session.generate(GenerationRequest(max_new_tokens=1, from_position=kept))]
        assert resumed[-1].session_length == kept + 1

        half = model.num_blocks // 2
        swarm.add_node(model, f"0:{half}", NODE_OPTIONS)
        swarm.add_node(model, f"{half}:{model.num_blocks}", NODE_OPTIONS)
        await wait_until(lambda: min(servers_per_block(swarm, model)) == 2, READY_TIMEOUT)
        await asyncio.sleep(3)  # the client's routing table (refreshed every 2 s) knows them
        swarm.stop_node(whole, crash=True)  # only the two halves are left
        # Once the dead server's record has expired and the client's routing table no longer has it,
        # the session's next step fails on it and the retry routes through the halves (petals would
        # otherwise retry on the stale route until its few retries are spent).
        await wait_until(lambda: max(servers_per_block(swarm, model)) == 1, READY_TIMEOUT)
        await asyncio.sleep(3)

        first_half, second_half = (online_servers(swarm, model)[block] for block in (0, model.num_blocks - 1))
        after = [update async for update in session.generate(GenerationRequest(max_new_tokens=AFTER - 1,
                                                                               trace_route=True))]
        text = "".join(update.outputs for update in before + resumed + after)
        assert sum(update.token_count for update in before + resumed + after) == BEFORE + AFTER
        assert text == expected.rstrip("\ufffd")
        # The trace shows the failover: the dead server's failure, then the two halves.
        route = after[-1].route
        assert route["failures"] >= 1 and route["events"][0]["peer_id"] == whole_peer
        assert route["events"][0]["step"] == 1 and route["events"][0]["blocks"] == [0, model.num_blocks]
        assert [(span["peer_id"], span["blocks"]) for span in route["spans"]] == [
            (first_half.pop(), [0, half]), (second_half.pop(), [half, model.num_blocks])]
        await session.aclose("test done")
    finally:
        await manager.close()
