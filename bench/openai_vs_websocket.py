"""A streamed chat completion (OpenAI API) next to the same generation over the WebSocket API.

One server process on one local swarm serving the default model; the same greedy chat reply is
streamed through ``/v1/chat/completions`` (the official ``openai`` client) and through
``/api/v2/generate`` (``max_new_tokens: 1`` until ``<|im_end|>``), alternately. Prints the time
to first token and the tokens/s after it, medians over the runs.

    .venv/bin/python bench/openai_vs_websocket.py [--runs 5]
"""

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import openai  # noqa: E402

from bench.common import default_model_files, local_swarm, start_server, stop_server, websocket_stream  # noqa: E402
from model_specs import model_from_source  # noqa: E402

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


async def websocket_reply(url: str, model: str, prompt: str) -> tuple:
    """The same reply over the WebSocket API, from opening the connection."""
    stream = await websocket_stream(url, model, prompt, session_length=1024, max_length=MAX_TOKENS + 200,
                                    stop_sequence="<|im_end|>", max_tokens=MAX_TOKENS)
    return stream.first_text_seconds, stream.tokens_per_s_after_first, stream.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=5124)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec, path = default_model_files()
    served = model_from_source(str(path)).key
    with tempfile.TemporaryDirectory() as logs, local_swarm(spec, path, Path(logs)) as (running_swarm, _, _):
        server, _ = start_server(path, running_swarm.initial_peers, Path(logs) / "server.log", port=args.port)
        try:
            from transformers import AutoTokenizer

            prompt = AutoTokenizer.from_pretrained(path).apply_chat_template(
                MESSAGES, tokenize=False, add_generation_prompt=True)
            base_url, ws_url = f"http://127.0.0.1:{args.port}/v1", f"ws://127.0.0.1:{args.port}/api/v2/generate"
            asyncio.run(websocket_reply(ws_url, served, prompt))  # warm-up
            results = {"openai": [], "websocket": []}
            for _ in range(args.runs):
                results["openai"].append(asyncio.run(openai_stream(base_url, served)))
                results["websocket"].append(asyncio.run(websocket_reply(ws_url, served, prompt)))
        finally:
            stop_server(server)
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
