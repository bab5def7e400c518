"""A streamed chat completion (OpenAI API) next to the same generation over the WebSocket API.

One server process on one local swarm serving the default model; the same greedy chat reply is
streamed through ``/v1/chat/completions`` (the official ``openai`` client) and through
``/api/v2/generate`` (``max_new_tokens: 1`` until ``<|im_end|>``), alternately. Prints the time
to first token and the tokens/s after it, medians over the runs.

    .venv/bin/python bench/openai_vs_websocket.py [--runs 5]
"""

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import openai  # noqa: E402
from websocket_streams import connect, request, start_server  # noqa: E402

from config import default_model, model_from_source  # noqa: E402
from swarm.default_model import ensure_default_model  # noqa: E402
from swarm.local import LocalSwarm, SwarmModel, count_blocks  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write three sentences about lighthouses."}]
MAX_TOKENS = 64


async def openai_stream(base_url: str, model: str) -> tuple:
    """(seconds to first token, tokens/s after it, tokens) of a streamed chat completion."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    started = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                                  max_tokens=MAX_TOKENS, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
    ended = time.perf_counter()
    await client.close()
    return first - started, (tokens - 1) / (ended - first), tokens


async def websocket_stream(url: str, model: str, prompt: str) -> tuple:
    """The same reply over the WebSocket API, from opening the connection."""
    started = time.perf_counter()
    connection = await connect(url)
    await request(connection, {"type": "open_inference_session", "model": model, "max_length": 1024})
    await connection.write_message(json.dumps({"type": "generate", "inputs": prompt, "max_new_tokens": 1,
                                               "stop_sequence": "<|im_end|>",
                                               "max_length": MAX_TOKENS + 200}))
    first, tokens = None, 0
    while True:
        reply = json.loads(await connection.read_message())
        tokens += reply["token_count"]
        if first is None and reply["outputs"]:
            first = time.perf_counter()
        if reply["stop"] or tokens >= MAX_TOKENS:
            break
    ended = time.perf_counter()
    connection.close()
    return first - started, (tokens - 1) / (ended - first), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=5124)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec = default_model(REPO_ROOT / ".models")
    path = ensure_default_model(spec.path.parent)
    served = model_from_source(str(path)).key
    swarm_model = SwarmModel(str(path), spec.swarm_prefix, count_blocks(str(path)))
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(Path(logs), threads=1) as running_swarm:
        running_swarm.add_node(swarm_model)
        running_swarm.wait_until_ready([swarm_model])
        server = start_server(str(path), running_swarm.initial_peers, args.port)
        try:
            from transformers import AutoTokenizer

            prompt = AutoTokenizer.from_pretrained(path).apply_chat_template(
                MESSAGES, tokenize=False, add_generation_prompt=True)
            base_url, ws_url = f"http://127.0.0.1:{args.port}/v1", f"ws://127.0.0.1:{args.port}/api/v2/generate"
            asyncio.run(websocket_stream(ws_url, served, prompt))  # warm-up
            results = {"openai": [], "websocket": []}
            for _ in range(args.runs):
                results["openai"].append(asyncio.run(openai_stream(base_url, served)))
                results["websocket"].append(asyncio.run(websocket_stream(ws_url, served, prompt)))
        finally:
            server.terminate()
            server.wait(60)
    print(f"model: {spec.key}, greedy chat reply, up to {MAX_TOKENS} tokens, median of {args.runs} runs")
    for name, runs in results.items():
        ttft = statistics.median(run[0] for run in runs)
        rate = statistics.median(run[1] for run in runs)
        print(f"{name:>9}: first token {1000 * ttft:7.1f} ms, then {rate:6.2f} tokens/s "
              f"({runs[0][2]} tokens)")
    ratio = statistics.median(r[1] for r in results["openai"]) / statistics.median(r[1] for r in results["websocket"])
    print(f"tokens/s ratio openai/websocket: {ratio:.2f}")


if __name__ == "__main__":
    main()
