"""Streaming over the WebSocket API next to the Petals client called directly, on one local swarm.

For 1, 8 and 32 concurrent streams it measures the gap between consecutive tokens (p50, p99)
and the total tokens/s, (a) with the petals client driven directly in this process (one thread
per stream, one inference-session step per token) and (b) through ``/api/v2/generate`` of a
server process (``max_new_tokens: 1`` with a ``stop_sequence``, one connection per stream),
and prints the ratios, and the server's event-loop CPU time per streamed token (its main
thread's CPU time while the WebSocket streams ran, over their tokens). Then it opens idle sessions (connections that opened an inference
session and wait) and checks that a fresh session still gets its first token within twice its
time on an idle server.

    .venv/bin/python bench/websocket_streams.py [--model tiny|default] [--tokens 40] [--repeats 10] [--streams 1 8 32]
        [--idle 1000]

On a 2-core machine a p50 ratio from 5 repeats of 30 tokens moves by about 0.05 from run to
run with the machine's other load; the default 10 alternating repeats of 40 tokens narrow that.
"""

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402

from bench.common import (  # noqa: E402
    PROMPT,
    connect,
    default_model_files,
    local_swarm,
    percentile,
    request,
    start_server,
    stop_server,
    tiny_llama_files,
    websocket_stream,
)
from model_specs import model_from_source  # noqa: E402
from sessions.engine.token_stream import TokenStream  # noqa: E402
from sessions.models import load_model  # noqa: E402

CONCURRENCY = (1, 8, 32)


def summarize(gaps, tokens: int, seconds: float) -> dict:
    return {"gaps": gaps, "tokens": tokens, "tokens_per_s": tokens / seconds}


def event_loop_cpu_seconds(pid: int) -> float:
    """The CPU time so far of the event loop of the server process ``pid``: its main thread's."""
    main_thread = next(thread for thread in psutil.Process(pid).threads() if thread.id == pid)
    return main_thread.user_time + main_thread.system_time


def pooled(runs) -> dict:
    """Gap percentiles over every run's gaps, and the median run's tokens/s."""
    gaps = [gap for run in runs for gap in run["gaps"]]
    return {"p50_ms": 1000 * percentile(gaps, 0.5), "p99_ms": 1000 * percentile(gaps, 0.99),
            "tokens_per_s": statistics.median(run["tokens_per_s"] for run in runs)}


def direct_streams(loaded, streams: int, tokens: int) -> dict:
    """Each stream: a thread stepping its own petals inference session token by token."""
    prompt_ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    gaps, lock, barrier = [], threading.Lock(), threading.Barrier(streams)

    def run():
        stream = TokenStream(loaded, len(prompt_ids) + tokens + 1)
        try:
            barrier.wait()
            stream.step(prompt_ids)
            last, own = time.perf_counter(), []
            for _ in range(tokens - 1):
                stream.step()
                now = time.perf_counter()
                own.append(now - last)
                last = now
            with lock:
                gaps.extend(own)
        finally:
            stream.close()

    threads = [threading.Thread(target=run) for _ in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(gaps, streams * tokens, time.perf_counter() - started)


async def websocket_streams(url: str, model: str, prompt_tokens: int, streams: int, tokens: int) -> dict:
    """``streams`` concurrent streams over ``/api/v2/generate``, each ``tokens`` tokens after PROMPT."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(websocket_stream(url, model, PROMPT, session_length=prompt_tokens + tokens + 1,
                                                   max_length=prompt_tokens + tokens) for _ in range(streams)))
    return summarize([gap for run in runs for gap in run.gaps], sum(run.tokens for run in runs),
                     time.perf_counter() - started)


async def first_token_seconds(url: str, model: str) -> float:
    started = time.perf_counter()
    connection = await connect(url)
    try:
        await request(connection, {"type": "open_inference_session", "model": model, "max_length": 64})
        await request(connection, {"type": "generate", "inputs": PROMPT, "max_new_tokens": 1})
    finally:
        connection.close()
    return time.perf_counter() - started


async def idle_sessions(url: str, model: str, target: int) -> list:
    """(idle sessions held, median first-token seconds of a fresh session) at growing counts."""
    results, idle = [], []
    samples = [await first_token_seconds(url, model) for _ in range(5)]
    results.append((0, statistics.median(samples)))
    for count in sorted({target // 4, target // 2, target}):
        while len(idle) < count:
            batch = await asyncio.gather(*(connect(url) for _ in range(min(100, count - len(idle)))))
            await asyncio.gather(*(request(c, {"type": "open_inference_session", "model": model, "max_length": 64})
                                   for c in batch))
            idle.extend(batch)
        samples = [await first_token_seconds(url, model) for _ in range(5)]
        results.append((len(idle), statistics.median(samples)))
    for connection in idle:
        connection.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per stream")
    parser.add_argument("--repeats", type=int, default=10, help="alternating runs per concurrency")
    parser.add_argument("--streams", type=int, nargs="+", default=list(CONCURRENCY), help="concurrent streams")
    parser.add_argument("--idle", type=int, default=1000, help="idle sessions to hold (0: skip)")
    parser.add_argument("--port", type=int, default=5123)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as workdir:
        spec, path = tiny_llama_files(Path(workdir)) if args.model == "tiny" else default_model_files()
        log_dir = Path(workdir) / "logs"
        with local_swarm(spec, path, log_dir) as (running_swarm, swarm_model, _):
            loaded = load_model(spec, running_swarm.initial_peers, device="cpu", torch_dtype="float32")
            prompt_tokens = len(loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
            # every stream and idle session of this benchmark comes from one address, and the idle
            # sessions come on top of the default limits: start_server raises them
            server, _ = start_server(path, running_swarm.initial_peers, log_dir / "server.log", port=args.port)
            url = f"ws://127.0.0.1:{args.port}/api/v2/generate"
            served_name = model_from_source(str(path)).key  # the name the server process gives it
            try:
                direct_streams(loaded, 1, 4)  # warm-up
                asyncio.run(websocket_streams(url, served_name, prompt_tokens, 1, 4))
                print(f"model: {spec.key} ({swarm_model.num_blocks} blocks), {args.tokens} tokens per stream, "
                      f"{args.repeats} alternating runs each")
                print(f"{'streams':>7} | {'direct p50/p99 ms':>18} {'tok/s':>7} | {'websocket p50/p99 ms':>21} "
                      f"{'tok/s':>7} | {'p50 ratio':>9} {'p99 ratio':>9} {'tok/s ratio':>11} | "
                      f"{'loop ms/token':>13}")
                for streams in args.streams:
                    direct_runs, ws_runs, loop_seconds = [], [], 0.0
                    for _ in range(args.repeats):  # alternated, so drift in the machine's load hits both
                        direct_runs.append(direct_streams(loaded, streams, args.tokens))
                        loop_before = event_loop_cpu_seconds(server.pid)
                        ws_runs.append(asyncio.run(
                            websocket_streams(url, served_name, prompt_tokens, streams, args.tokens)))
                        loop_seconds += event_loop_cpu_seconds(server.pid) - loop_before
                    direct, ws = pooled(direct_runs), pooled(ws_runs)
                    loop_ms = 1000 * loop_seconds / sum(run["tokens"] for run in ws_runs)
                    print(f"{streams:>7} | {direct['p50_ms']:8.1f} /{direct['p99_ms']:8.1f} "
                          f"{direct['tokens_per_s']:7.1f} | {ws['p50_ms']:10.1f} /{ws['p99_ms']:9.1f} "
                          f"{ws['tokens_per_s']:7.1f} | {ws['p50_ms'] / direct['p50_ms']:9.2f} "
                          f"{ws['p99_ms'] / direct['p99_ms']:9.2f} {ws['tokens_per_s'] / direct['tokens_per_s']:11.2f} | "
                          f"{loop_ms:13.3f}")
                results = asyncio.run(idle_sessions(url, served_name, args.idle)) if args.idle else []
                if results:
                    print("idle sessions held -> fresh session's first token (median of 5)")
                for held, seconds in results:
                    baseline = results[0][1]
                    print(f"{held:>7} idle: {1000 * seconds:8.1f} ms ({seconds / baseline:4.2f}x)"
                          f"{'  within 2x' if seconds <= 2 * baseline else '  OVER 2x'}")
            finally:
                stop_server(server)
                loaded.close()


if __name__ == "__main__":
    main()
