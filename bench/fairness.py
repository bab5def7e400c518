"""Fairness between keys: one light stream's token gaps while a heavy key holds 16 streams, and
checks of the daily budget and of the waiting line.

One local swarm node serves the tiny Llama, and a server process (``server.py``) serves it; the
node and the server are pinned together to the first CPU core, this process (every client) to
the second. Every server reads the bench's key database (``--keys-db``). Two clients, each with a
key of its own (and an address of its own): the heavy one connects from 127.0.0.2 and holds
``--heavy-streams`` (16) concurrent WebSocket streams (``max_new_tokens: 1`` with a stop sequence
that never comes, each ``--heavy-tokens`` tokens by its ``max_length``, restarted as it ends so
that all of them always run); the light one connects from 127.0.0.3 and runs one stream of
``--tokens`` tokens. For each server variant it measures, per repeat:

- the light stream alone: the gap between its consecutive tokens (p50, p95);
- the heavy client alone: its tokens/s over ``--heavy-seconds``;
- the light stream under the heavy load: its gaps, and the heavy client's and the total
  (heavy + light) tokens/s while it runs.

and prints, per variant, the medians over the repeats: the light p50/p95 gap alone and under
load and their ratio (under load / alone), the heavy client's tokens/s alone and under load, the
total tokens/s under load and its ratio to the heavy client alone. The default variants are
``adaptive`` (the server's default on a joined swarm: fair turns, the steps in flight found from
their times), ``two`` (2 in flight, the embedded swarm's default for one model) and
``first-come`` (every step sent to the swarm at once, whose servers take them in arrival order:
fair scheduling off).

    .venv/bin/python bench/fairness.py [--tokens 60] [--repeats 3] [--heavy-streams 16]
        [--heavy-tokens 32] [--heavy-seconds 5] [--light-weight 1] [--variant NAME=ARGS ...]

``--variant NAME=ARGS`` (repeatable) names a server variant and the arguments appended to its
command line (``start_server``'s ``extra_args``), e.g. ``--variant "adaptive="
--variant "capped=--steps-in-flight 3"``. Each repeat starts each variant's server in turn on
the same swarm (alternating, so drift in the machine's load hits every variant), runs the three
measurements and stops it. Before them, three checks, each on a server of its own:

- clients: with a per-client connection limit of 1, a second connection with the heavy key is
  refused and one with the light key is not (the two keys count as two clients);
- quota: a key with a daily budget of 1,000 tokens asks for completions until refused; its
  replies' ``usage`` must add up to no more than 1,000, and ``/api/v1/usage`` to exactly that;
- queue: 64 sessions asked at once of a server that holds 32 must all be served, through the
  waiting line, none refused.

Run it under the swarm lock, as the tests run: ``flock /tmp/swarm-tests.lock ...``.
"""

import argparse
import asyncio
import json
import logging
import os
import statistics
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402

from bench.common import (  # noqa: E402
    NEVER,
    PROMPT,
    local_swarm,
    log_tail,
    percentile,
    start_server,
    stop_server,
    tiny_llama_files,
)
from bench.raw_websocket import CLOSE, RawWebSocket  # noqa: E402
from model_specs import model_from_source  # noqa: E402
from sessions.accounts.store import KeyLimits, KeyStore  # noqa: E402

HEAVY_IP = "127.0.0.2"
LIGHT_IP = "127.0.0.3"
# The API keys of the bench's key database, and the key each client address brings.
KEYS = ("heavy", "light", "budget")
KEY_OF_ADDRESS = {HEAVY_IP: "heavy", LIGHT_IP: "light"}
BUDGET_TOKENS = 1000  # the daily budget of the "budget" key
QUEUE_SESSIONS, QUEUE_SERVER_SESSIONS = 64, 32  # sessions asked of a server that holds this many
QUEUE_SESSION_TOKENS = 16
# Fair turns with the steps in flight found from their times (the default on a joined swarm, as
# here), with 2 in flight (the embedded swarm's default for one model), and with no cap: every
# step goes to the swarm at once, where its servers take them first come, first served.
DEFAULT_VARIANTS = [("adaptive", []), ("two", ["--steps-in-flight", "2"]),
                    ("first-come", ["--steps-in-flight", "8", "--executor-workers", "8"])]
PING, PONG = 0x9, 0xA
TRY_AGAIN_LATER = 1013  # the close code of a connection the server refuses
READ_TIMEOUT = 120.0  # seconds without a frame before a client gives up


# --- CPU pinning -------------------------------------------------------------------------------------


def pin_threads(process: psutil.Process, cores: Set[int]) -> None:
    """Every thread of ``process`` to ``cores`` (``sched_setaffinity`` of a pid moves one thread)."""
    try:
        threads = process.threads()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return
    for thread in threads:
        try:
            os.sched_setaffinity(thread.id, cores)
        except OSError:  # the thread ended meanwhile
            pass


@dataclass
class Pinning:
    """Swarm and server on one core, this process (the clients) on the other."""

    server_cores: Set[int]
    client_cores: Set[int]

    @classmethod
    def of_this_machine(cls) -> Optional["Pinning"]:
        cores = sorted(os.sched_getaffinity(0))
        return cls({cores[0]}, {cores[1]}) if len(cores) >= 2 else None

    def apply(self) -> None:
        """Every descendant of this process (the swarm's bootstrap DHT, its nodes, the server and
        their own children) to the server core, every thread of this process to the client core.
        Threads and processes started later inherit their starter's core."""
        this = psutil.Process()
        for child in this.children(recursive=True):
            pin_threads(child, self.server_cores)
        pin_threads(this, self.client_cores)

    def start_server(self, *args, **kwargs):
        """``start_server`` forked from a thread on the server core, then everything pinned."""
        os.sched_setaffinity(0, self.server_cores)
        try:
            return start_server(*args, **kwargs)
        finally:
            os.sched_setaffinity(0, self.client_cores)
            self.apply()


# --- a WebSocket client bound to a source address ------------------------------------------------------


class Closed(Exception):
    """The server closed the connection (``code``: its close code, None without a close frame)."""

    def __init__(self, code: Optional[int]):
        super().__init__(f"connection closed (code {code})")
        self.code = code


class Client(RawWebSocket):
    """One WebSocket connection to ``/api/v2/generate`` from a source address of its own
    (``RawWebSocket.connect(port, source_ip=...)``; tornado's ``websocket_connect`` cannot choose
    it), reading replies as a real client does."""

    async def receive(self) -> dict:
        """The next text message as JSON (answers pings; raises ``Closed`` on a close). The
        server sends each message as one frame."""
        while True:
            frame = await self.receive_frame(READ_TIMEOUT)
            if frame is None:
                raise Closed(None)
            opcode, payload = frame
            if opcode == CLOSE:
                raise Closed(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None)
            if opcode == PING:
                self.send_frame(payload, PONG)
            elif opcode != PONG:
                return json.loads(payload)

    async def request(self, message: dict) -> dict:
        """Sends ``message`` and returns its reply; RuntimeError for an error reply."""
        await self.send(message)
        reply = await self.receive()
        if not reply["ok"]:
            raise RuntimeError(reply.get("traceback", reply))
        return reply

    def close(self) -> None:
        """Sends a close frame (normal closure) and drops the connection."""
        try:
            self.send_frame(struct.pack("!H", 1000), CLOSE)
        except Exception:
            pass
        self.writer.close()


@dataclass
class Target:
    """Where the streams go: the server's port, the model's served name, the prompt's length, and
    the API key each source address brings (its name in ``KEYS``: the secret)."""

    port: int
    model: str
    prompt_tokens: int
    keys: Dict[str, str]

    def connect(self, source_ip: str, key: Optional[str] = None) -> "asyncio.Future[Client]":
        """A connection from ``source_ip`` with the key of that address (or the key named ``key``)."""
        secret = self.keys[key or KEY_OF_ADDRESS[source_ip]]
        return Client.connect(self.port, source_ip=source_ip, headers={"Authorization": f"Bearer {secret}"})


async def stream(target: Target, source_ip: str, tokens: int,
                 on_reply=lambda received, count: None, stopping=lambda: False) -> List[Tuple[float, int]]:
    """One generation of ``tokens`` tokens after PROMPT streamed token by token from
    ``source_ip``; ``on_reply(time, token_count)`` for each reply. Ends at its ``max_length``
    (or once ``tokens`` came, or when ``stopping()``). Returns (time, token_count) of each reply
    that brought tokens (``time.perf_counter``)."""
    client = await target.connect(source_ip)
    try:
        await client.request({"type": "open_inference_session", "model": target.model,
                              "max_length": target.prompt_tokens + tokens + 1})
        await client.send({"type": "generate", "inputs": PROMPT, "max_new_tokens": 1, "stop_sequence": NEVER,
                           "max_length": target.prompt_tokens + tokens})
        times, count = [], 0
        while not stopping():
            reply = await client.receive()
            if not reply["ok"]:
                raise RuntimeError(reply.get("traceback", reply))
            received = time.perf_counter()
            on_reply(received, reply["token_count"])
            if reply["token_count"]:
                times.append((received, reply["token_count"]))
                count += reply["token_count"]
            if reply["stop"] or count >= tokens:
                break
        return times
    finally:
        client.close()


# --- the measurements ----------------------------------------------------------------------------------


@dataclass
class LightRun:
    p50_ms: float
    p95_ms: float
    tokens_after_first: int  # tokens of the replies after the first (those the gaps end at)
    started: float  # the first reply with tokens
    ended: float  # the last


async def light_stream(target: Target, tokens: int) -> LightRun:
    """The light client's stream: its gaps between consecutive tokens."""
    replies = await stream(target, LIGHT_IP, tokens)
    times = [received for received, _ in replies]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    return LightRun(1000 * percentile(gaps, 0.5), 1000 * percentile(gaps, 0.95),
                    sum(count for _, count in replies[1:]), times[0], times[-1])


@dataclass
class HeavyClient:
    """``streams`` concurrent streams from HEAVY_IP, each restarted as it ends."""

    target: Target
    streams: int
    tokens: int
    replies: List[Tuple[float, int]] = field(default_factory=list)  # (received, token_count)
    started_streams: Set[int] = field(default_factory=set)  # streams that received a token
    stopping: bool = False
    tasks: List[asyncio.Task] = field(default_factory=list)

    async def _run(self, index: int) -> None:
        def on_reply(received: float, count: int) -> None:
            self.replies.append((received, count))
            if count:
                self.started_streams.add(index)

        while not self.stopping:
            await stream(self.target, HEAVY_IP, self.tokens, on_reply, lambda: self.stopping)

    async def start(self, warmup: float) -> None:
        """Starts every stream; returns ``warmup`` seconds after each received its first token."""
        self.tasks = [asyncio.ensure_future(self._run(index)) for index in range(self.streams)]
        while len(self.started_streams) < self.streams:
            failed = [task for task in self.tasks if task.done()]
            if failed:
                await self.stop()
            await asyncio.sleep(0.05)
        await asyncio.sleep(warmup)

    def tokens_between(self, start: float, end: float) -> int:
        return sum(count for received, count in self.replies if start <= received <= end)

    async def stop(self) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        errors = [result for result in results
                  if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError)]
        if errors:
            raise RuntimeError(f"a heavy stream failed: {errors[0]!r}") from errors[0]


@dataclass
class Measurement:
    """One repeat of one variant."""

    alone: LightRun
    loaded: LightRun
    heavy_alone_tps: float
    heavy_loaded_tps: float
    total_loaded_tps: float


async def measure(target: Target, args, pinning: Optional[Pinning]) -> Measurement:
    # warm-up: each client's first stream on a fresh server
    await asyncio.gather(stream(target, LIGHT_IP, 4), stream(target, HEAVY_IP, 4))
    if pinning:
        pinning.apply()
    alone = await light_stream(target, args.tokens)

    heavy = HeavyClient(target, args.heavy_streams, args.heavy_tokens)
    await heavy.start(args.warmup)
    try:
        window_start = time.perf_counter()
        await asyncio.sleep(args.heavy_seconds)
        window_end = time.perf_counter()
        heavy_alone_tps = heavy.tokens_between(window_start, window_end) / (window_end - window_start)

        loaded = await light_stream(target, args.tokens)
        # the window from the light stream's first token to its last, as its gaps
        seconds = loaded.ended - loaded.started
        heavy_tokens = heavy.tokens_between(loaded.started + 1e-9, loaded.ended)
        heavy_loaded_tps = heavy_tokens / seconds
        total_loaded_tps = (heavy_tokens + loaded.tokens_after_first) / seconds
    finally:
        await heavy.stop()
    return Measurement(alone, loaded, heavy_alone_tps, heavy_loaded_tps, total_loaded_tps)


async def check_clients(target: Target) -> None:
    """On a server whose per-client connection limit is 1: a second connection from HEAVY_IP is
    refused, one from LIGHT_IP is not (the server counts the two addresses as two clients)."""
    first = await target.connect(HEAVY_IP)
    try:
        # an answered request: the first connection surely holds its place
        await first.request({"type": "open_inference_session", "model": target.model, "max_length": 8})
        second = await target.connect(HEAVY_IP)
        try:
            while True:  # the refusal's error reply, then its close
                reply = await asyncio.wait_for(second.receive(), 10.0)
                if reply.get("ok", True):
                    raise RuntimeError(f"a second connection from {HEAVY_IP} was not refused: {reply}")
        except asyncio.TimeoutError:
            raise RuntimeError(f"a second connection from {HEAVY_IP} was not closed") from None
        except Closed as closed:
            if closed.code != TRY_AGAIN_LATER:
                raise RuntimeError(f"a second connection from {HEAVY_IP} closed with {closed.code}") from None
        finally:
            second.close()
        other = await target.connect(LIGHT_IP)
        try:
            await asyncio.wait_for(other.receive(), 2.0)
            raise RuntimeError(f"the server sent something unasked to {LIGHT_IP}")
        except asyncio.TimeoutError:
            pass  # still open: admitted as a client of its own
        except Closed as closed:
            raise RuntimeError(f"a connection from {LIGHT_IP} was refused (code {closed.code}): "
                               f"the server counts it as the same client as {HEAVY_IP}") from None
        finally:
            other.close()
    finally:
        first.close()


def http_json(port: int, path: str, secret: str, body: Optional[dict] = None) -> Tuple[int, dict]:
    """The status and JSON reply of a GET (or, with ``body``, a POST) bringing the key ``secret``."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {secret}"})
    try:
        with urllib.request.urlopen(request, timeout=READ_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def check_quota(target: Target) -> str:
    """The "budget" key asks for completions until it is refused: its replies' ``usage`` may add
    up to no more than its budget, and ``/api/v1/usage`` must account exactly what they say."""
    served, replies = 0, 0
    while True:
        status, reply = await asyncio.to_thread(http_json, target.port, "/v1/completions", target.keys["budget"],
                                                {"model": target.model, "prompt": PROMPT, "max_tokens": 64})
        if status != 200:
            break
        served += reply["usage"]["total_tokens"]
        replies += 1
    if status != 429 or reply["error"]["code"] != "insufficient_quota":
        raise RuntimeError(f"the spent budget was answered {status}: {reply}")
    _, report = await asyncio.to_thread(http_json, target.port, "/api/v1/usage", target.keys["budget"])
    accounted = report["today"]["total_tokens"]
    if served > BUDGET_TOKENS or accounted != served:
        raise RuntimeError(f"a budget of {BUDGET_TOKENS} served {served} tokens, accounted {accounted}")
    return (f"quota check: a budget of {BUDGET_TOKENS} tokens served {served} in {replies} replies (their usage), "
            f"then 429 insufficient_quota; /api/v1/usage accounts {accounted}")


async def check_queue(target: Target) -> str:
    """``QUEUE_SESSIONS`` sessions asked at once of a server that holds ``QUEUE_SERVER_SESSIONS``:
    each waits in line for room (told its place) and streams ``QUEUE_SESSION_TOKENS`` tokens; any
    refusal fails the check."""
    positions: List[int] = []

    async def session() -> bool:
        client = await target.connect(HEAVY_IP)
        waited = False
        try:
            await client.send({"type": "open_inference_session", "model": target.model, "queue_updates": True,
                               "max_length": target.prompt_tokens + QUEUE_SESSION_TOKENS + 1})
            while (reply := await client.receive()).get("queued"):
                positions.append(reply["position"])
                waited = True
            if not reply["ok"]:
                raise RuntimeError(f"a session was refused: {reply.get('traceback', reply)}")
            await client.send({"type": "generate", "inputs": PROMPT, "max_new_tokens": 1, "stop_sequence": NEVER,
                               "max_length": target.prompt_tokens + QUEUE_SESSION_TOKENS})
            while not (reply := await client.receive())["stop"]:
                if not reply["ok"]:
                    raise RuntimeError(f"a generation failed: {reply.get('traceback', reply)}")
            return waited
        finally:
            client.close()

    started = time.perf_counter()
    results = await asyncio.gather(*(session() for _ in range(QUEUE_SESSIONS)), return_exceptions=True)
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        raise RuntimeError(f"{len(failures)} of {QUEUE_SESSIONS} sessions failed: {failures[0]!r}") from failures[0]
    return (f"queue check: {QUEUE_SESSIONS} sessions asked of a server that holds {QUEUE_SERVER_SESSIONS}: all "
            f"served, {sum(results)} after waiting in line (places up to {max(positions, default=0)}), "
            f"in {time.perf_counter() - started:.1f} s")


def make_keys(path: Path, light_weight: float) -> Dict[str, str]:
    """The bench's key database: name -> secret of each key of ``KEYS``."""
    limits = {"heavy": KeyLimits(), "light": KeyLimits(weight=light_weight),
              "budget": KeyLimits(daily_tokens=BUDGET_TOKENS)}
    with KeyStore(path) as store:
        return {name: store.add_key(name, limits[name]) for name in KEYS}


def parse_variant(text: str) -> Tuple[str, List[str]]:
    name, separator, extra = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=ARGS, got {text!r}")
    return name, extra.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=60, help="tokens of the light stream")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per variant (medians reported)")
    parser.add_argument("--heavy-streams", type=int, default=16, help="concurrent streams of the heavy client")
    parser.add_argument("--heavy-tokens", type=int, default=32, help="tokens of each heavy stream")
    parser.add_argument("--heavy-seconds", type=float, default=5.0, help="window of the heavy client alone")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds after every heavy stream's first token before measuring")
    parser.add_argument("--variant", type=parse_variant, action="append", metavar="NAME=ARGS",
                        help="a server variant: its name and the arguments appended to its command line "
                             "(repeatable; default: default=)")
    parser.add_argument("--light-weight", type=float, default=1.0,
                        help="the light key's share of the swarm's steps, relative to the heavy key's")
    parser.add_argument("--skip-client-check", action="store_true",
                        help="do not check that the two keys count as two clients")
    parser.add_argument("--skip-checks", action="store_true", help="do not run the quota and queue checks")
    args = parser.parse_args()
    variants: Dict[str, List[str]] = dict(args.variant or DEFAULT_VARIANTS)
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoTokenizer

    pinning = Pinning.of_this_machine()
    with tempfile.TemporaryDirectory() as workdir:
        spec, path = tiny_llama_files(Path(workdir))
        # counted without the tokenizer's thread pool, so that the processes forked later (the
        # swarm node, the servers) keep theirs; the setting is not passed on to them
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            prompt_tokens = len(AutoTokenizer.from_pretrained(path)(PROMPT, add_special_tokens=False)["input_ids"])
        finally:
            del os.environ["TOKENIZERS_PARALLELISM"]
        served_name = model_from_source(str(path)).key  # the name the server process gives it
        log_dir = Path(workdir) / "logs"
        with local_swarm(spec, path, log_dir) as (running_swarm, swarm_model, _):
            if pinning:
                pinning.apply()
                print(f"swarm node and server on core {sorted(pinning.server_cores)}, "
                      f"clients on core {sorted(pinning.client_cores)}")
            else:
                print("one CPU core: nothing pinned")
            launch = pinning.start_server if pinning else start_server

            keys_db = Path(workdir) / "keys.db"
            keys = make_keys(keys_db, args.light_weight)

            def run_server(name: str, extra: Sequence[str], job):
                log_path = log_dir / f"server-{name}.log"
                server, url = launch(path, running_swarm.initial_peers, log_path,
                                     extra_args=["--keys-db", str(keys_db), *extra])
                try:
                    return asyncio.run(job(Target(urlparse(url).port, served_name, prompt_tokens, keys)))
                except Exception:
                    print(f"last lines of {log_path}:\n{log_tail(log_path)}", file=sys.stderr)
                    raise
                finally:
                    stop_server(server)

            if not args.skip_client_check:
                run_server("client-check", ["--max-connections-per-client", "1"],
                           check_clients)
                print(f"client check: the keys of {HEAVY_IP} and {LIGHT_IP} count as two clients")
            if not args.skip_checks:
                print(run_server("quota-check", [], check_quota), flush=True)
                print(run_server("queue-check", ["--max-sessions", str(QUEUE_SERVER_SESSIONS),
                                                 "--max-sessions-per-client", str(QUEUE_SESSIONS)], check_queue),
                      flush=True)
            print(f"model: {spec.key} ({swarm_model.num_blocks} blocks); light stream {args.tokens} tokens "
                  f"from {LIGHT_IP}; heavy client {args.heavy_streams} streams of {args.heavy_tokens} tokens "
                  f"from {HEAVY_IP}; {args.repeats} alternating repeats, medians")
            results: Dict[str, List[Measurement]] = {name: [] for name in variants}
            for repeat in range(args.repeats):
                for name, extra in variants.items():
                    measurement = run_server(name, extra, lambda target: measure(target, args, pinning))
                    results[name].append(measurement)
                    print(f"  repeat {repeat + 1} {name}: light p50 {measurement.alone.p50_ms:.1f} -> "
                          f"{measurement.loaded.p50_ms:.1f} ms, p95 {measurement.alone.p95_ms:.1f} -> "
                          f"{measurement.loaded.p95_ms:.1f} ms; heavy alone {measurement.heavy_alone_tps:.1f} "
                          f"tok/s, total under load {measurement.total_loaded_tps:.1f} tok/s", flush=True)

    median = statistics.median
    print(f"{'variant':<12} | {'light alone p50/p95 ms':>22} | {'under load p50/p95 ms':>22} | "
          f"{'ratio p50/p95':>13} | {'heavy alone tok/s':>17} | {'heavy loaded tok/s':>18} | "
          f"{'total loaded tok/s':>18} | {'total/heavy':>11}")
    for name, runs in results.items():
        alone50, alone95 = median(r.alone.p50_ms for r in runs), median(r.alone.p95_ms for r in runs)
        load50, load95 = median(r.loaded.p50_ms for r in runs), median(r.loaded.p95_ms for r in runs)
        heavy_alone = median(r.heavy_alone_tps for r in runs)
        heavy_loaded = median(r.heavy_loaded_tps for r in runs)
        total = median(r.total_loaded_tps for r in runs)
        print(f"{name:<12} | {alone50:10.1f} /{alone95:10.1f} | {load50:10.1f} /{load95:10.1f} | "
              f"{load50 / alone50:6.2f} {load95 / alone95:6.2f} | {heavy_alone:17.1f} | {heavy_loaded:18.1f} | "
              f"{total:18.1f} | {total / heavy_alone:11.2f}")


if __name__ == "__main__":
    main()
