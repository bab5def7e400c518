"""A growing conversation with and without prefix reuse, and a dropped connection resumed or replayed.

One local swarm serving the default model and two server processes on it: one with prefix reuse
(the default), one with ``--warm-sessions 0``. An 8-turn conversation runs through the official
``openai`` client (streamed, greedy), each turn on both servers one after the other. Per turn it
prints the time to first token and the prompt tokens fed through the swarm (read from each
server's ``/metrics``) next to the tokens the turn added to the conversation.

Then, over the WebSocket API: a 6-turn conversation in a resumable session, its connection
dropped, and the time from reconnecting to the next turn's first token, when the session is
resumed and when the conversation is replayed into a new session (what a client without
resumable sessions does).

    .venv/bin/python bench/conversation.py [--turns 8] [--max-tokens 40]
"""

import argparse
import asyncio
import json
import logging
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import openai  # noqa: E402

from bench.common import connect, default_model_files, local_swarm, request, start_server, stop_server  # noqa: E402
from model_specs import model_from_source  # noqa: E402

QUESTIONS = [
    "Name a large city in Europe.",
    "What is it known for?",
    "Which river runs through it?",
    "Name another city on that river.",
    "How far apart are the two cities?",
    "Which one is older?",
    "Suggest a day trip from the older one.",
    "Summarise our conversation in one sentence.",
]
STOP = "<|im_end|>"


def fed_tokens(port: int) -> float:
    """Prompt tokens the server has fed through the swarm so far (its /metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return sum(float(value) for value in re.findall(r"^swarm_chat_input_tokens_total\{[^}]*\} (\S+)$", text, re.M))


async def chat_turn(client: openai.AsyncOpenAI, port: int, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed turn: its reply, time to first token, usage and tokens fed."""
    before = fed_tokens(port)
    started = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = await client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                  max_tokens=max_tokens, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        elif chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
    return {"reply": "".join(pieces), "ttft": first - started, "prompt": usage.prompt_tokens,
            "completion": usage.completion_tokens, "cached": usage.prompt_tokens_details.cached_tokens,
            "fed": fed_tokens(port) - before}


async def conversation(ports: dict, model: str, turns: int, max_tokens: int) -> dict:
    """The same conversation on every server, turn by turn; per server, each turn's figures."""
    clients = {name: openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
               for name, port in ports.items()}
    histories = {name: [] for name in ports}
    results = {name: [] for name in ports}
    for question in QUESTIONS[:turns]:
        for name, port in ports.items():
            histories[name].append({"role": "user", "content": question})
            turn = await chat_turn(clients[name], port, model, histories[name], max_tokens)
            histories[name].append({"role": "assistant", "content": turn["reply"]})
            results[name].append(turn)
    for client in clients.values():
        await client.close()
    return results


def chatml(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


async def ws_turn(connection, inputs: str, max_tokens: int) -> tuple:
    """Sends one turn; returns (when its first token came, the reply, the last seq seen)."""
    await connection.write_message(json.dumps({"type": "generate", "inputs": inputs, "max_new_tokens": 1,
                                               "stop_sequence": STOP, "max_length": 2048}))
    first, outputs, tokens, seq = None, "", 0, 0
    while True:
        reply = json.loads(await connection.read_message())
        assert reply["ok"], reply
        seq = reply.get("seq", seq)
        tokens += reply["token_count"]
        first = first or time.perf_counter()
        outputs += reply["outputs"]
        if reply["stop"] or tokens >= max_tokens:
            break
    if not reply["stop"]:
        await connection.write_message(json.dumps({"type": "stop"}))
        while not reply["stop"]:
            reply = json.loads(await connection.read_message())
            seq = reply.get("seq", seq)
    return first, outputs, seq


async def resume_vs_replay(url: str, model: str, turns: int, max_tokens: int) -> dict:
    """Seconds from reconnecting to the next turn's first token: resumed, and replayed."""
    connection = await connect(url)
    opened = await request(connection, {"type": "open_inference_session", "model": model, "max_length": 2048,
                                        "resumable": True})
    transcript, seq, ended_with_stop = "", 0, False  # transcript: the conversation as a replay sends it
    for question in QUESTIONS[:turns + 1]:
        # The reply's stop token, when the model wrote it, is already in the session.
        closing = ("\n" if ended_with_stop else STOP + "\n") if transcript else ""
        turn = chatml("user", question) + "<|im_start|>assistant\n"
        if question == QUESTIONS[turns]:
            break
        _, outputs, seq = await ws_turn(connection, closing + turn, max_tokens)
        ended_with_stop = STOP in outputs
        transcript += (STOP + "\n" if transcript else "") + turn + outputs.split(STOP)[0]
    connection.close()  # dropped (no close code): the session waits for its client
    await asyncio.sleep(0.5)
    next_turn = closing + turn

    started = time.perf_counter()
    resumed = await connect(url)
    await request(resumed, {"type": "resume_inference_session", "session_id": opened["session_id"],
                            "resume_token": opened["resume_token"], "last_seq": seq})
    first, _, _ = await ws_turn(resumed, next_turn, max_tokens)
    resume_seconds = first - started
    resumed.close(1000)

    started = time.perf_counter()
    replayed = await connect(url)
    await request(replayed, {"type": "open_inference_session", "model": model, "max_length": 2048})
    first, _, _ = await ws_turn(replayed, transcript + STOP + "\n" + turn, max_tokens)
    replay_seconds = first - started
    replayed.close(1000)
    return {"resume": resume_seconds, "replay": replay_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--resume-turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--port", type=int, default=5131)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec, path = default_model_files()
    served = model_from_source(str(path)).key
    ports = {"reuse": args.port, "no reuse": args.port + 1}
    with tempfile.TemporaryDirectory() as logs, local_swarm(spec, path, Path(logs)) as (running_swarm, _, _):
        servers = []
        try:
            for name, extra_args in (("reuse", ()), ("no reuse", ("--warm-sessions", "0"))):
                servers.append(start_server(path, running_swarm.initial_peers, Path(logs) / f"server-{ports[name]}.log",
                                            port=ports[name], extra_args=extra_args)[0])
            results = asyncio.run(conversation(ports, served, args.turns, args.max_tokens))
            resume = asyncio.run(resume_vs_replay(f"ws://127.0.0.1:{ports['reuse']}/api/v2/generate", served,
                                                  args.resume_turns, args.max_tokens))
        finally:
            for server in servers:
                stop_server(server)
    print(f"model: {spec.key}, {args.turns} turns through the openai client (streamed, greedy, "
          f"up to {args.max_tokens} tokens per reply)")
    print("| turn | prompt tokens | new tokens | first token, reuse | fed, reuse | first token, no reuse | "
          "fed, no reuse |")
    print("|---|---|---|---|---|---|---|")
    reuse, plain = results["reuse"], results["no reuse"]
    for index, (on, off) in enumerate(zip(reuse, plain)):
        previous = plain[index - 1] if index else None
        new = off["prompt"] - (previous["prompt"] + previous["completion"] - 1 if previous else 0)
        print(f"| {index + 1} | {off['prompt']} | {new} | {1000 * on['ttft']:.0f} ms | {on['fed']:.0f} | "
              f"{1000 * off['ttft']:.0f} ms | {off['fed']:.0f} |")
    print(f"turn {args.turns} / turn 1 first-token time: reuse {reuse[-1]['ttft'] / reuse[0]['ttft']:.2f}x, "
          f"no reuse {plain[-1]['ttft'] / plain[0]['ttft']:.2f}x")
    same = all(on["reply"] == off["reply"] for on, off in zip(reuse, plain))
    print(f"replies identical with and without reuse: {same}; "
          f"median first token {1000 * statistics.median(t['ttft'] for t in reuse):.0f} ms vs "
          f"{1000 * statistics.median(t['ttft'] for t in plain):.0f} ms")
    print(f"\nafter {args.resume_turns} turns over the WebSocket, a dropped connection: from reconnecting to the "
          f"next turn's first token")
    print("| resumed | replayed into a new session |")
    print("|---|---|")
    print(f"| {1000 * resume['resume']:.0f} ms | {1000 * resume['replay']:.0f} ms |")


if __name__ == "__main__":
    main()
