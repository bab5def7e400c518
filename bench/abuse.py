"""Hostile clients against a real server process: what each attack costs one legitimate stream beside it.

Starts a local swarm of two nodes, each hosting every block of a tiny Llama (4 blocks, so the
figures show the server, not compute), and ``server.py`` as a separate process with its default
per-client limits, no trusted proxy, and ``--request-timeout 5`` (so that the server may give up
on a hung swarm node within a row). Then runs one row per attack, one after another, on an
otherwise idle server, each followed by its control row:

1. samples the server's resident memory (RSS) and its /metrics;
2. starts the legitimate client: one WebSocket stream from 127.0.0.1, one token per reply, in
   this process; once it has its first token, the attack starts, and a process of its own (the
   prober) starts polling ``GET /health`` every 50 ms;
3. runs the attack for ``--seconds`` in another process (the attacker), from loopback addresses
   other than 127.0.0.1 (so that the per-client limits fall on the attacker, as they would for a
   remote one);
4. stops the attack, closes its sockets, waits (at most a minute) until the server's
   ``swarm_chat_open_sessions`` gauge is 0, and samples RSS and /metrics again;
5. runs the attack's control row the same way: instead of the attack, a polite client in the
   attacker's process, from the attacker's address, does the work the server did for the attack
   (as its /metrics counted it, less the legitimate stream's: the sessions opened and the tokens
   generated), as sessions started at evenly spaced times over the row's seconds, each generating
   its share of the tokens in one reply. A legitimate stream's gap may grow with the work an
   attacker is allowed; it must not grow more because the work came as an attack.

The rows: ``baseline`` (no attack; run first, for reference), ``long stop strings`` (stop
strings far over the limits on ``/v1/completions``, ``/api/v1/generate`` and the WebSocket, and
the most that is allowed: 16 on ``/v1`` (the model's end-of-sequence text among them) and on the
WebSocket, of 1,000 characters each, every one beginning with the text the model will write, so
that the hold-back runs), ``queue flood`` (one
session sending ``generate`` frames as fast as the socket takes them: the server reads them only
as fast as its message rate allows, and the row counts those it answered), ``large bodies``
(50-100 MB bodies, announced by Content-Length or chunked), ``sessionless sockets`` (about 2,000
WebSockets from 32 addresses that never send a frame), ``slow readers`` (long generations on
sockets that are never read, which also send frames whose error replies are large; the server
reads them only as fast as the client's bytes per second allow), ``many sessions from one
address`` (past ``--max-sessions-per-client``), ``grammar bomb`` (a JSON schema whose ``$defs``
nest ``allOf`` of two ``$ref`` 20 levels deep, as ``response_format`` and as a tool's
parameters, from 4 concurrent clients), ``tokenization flood`` (200 concurrent
``/v1/completions`` of one token from one address, over and over, with prompts of 650,000
characters and of the longest the server tokenizes rather than refuses unread),
``forged proxy headers`` (from one address, WebSockets past the per-client connection and
session limits and HTTP generations, each naming another client in ``X-Forwarded-For``,
``X-Real-IP`` and ``Forwarded``: as no proxy is trusted, all count as one client) and ``hung
swarm server`` (the busiest swarm node is frozen with SIGSTOP, its whole process group, while
several clients generate, and thawed at the end of the row; its control row freezes nothing).

Each row reports what the attacker (or the polite client) did and what the server answered, the
work the server did for it, the error replies the server counted, ``/health`` p50/p99, the p99
of the server's event-loop lag (``swarm_chat_event_loop_lag_seconds``: the bucket bound under
which 99% of the row's samples fell), the legitimate stream's p50 and p99 gaps between tokens,
the growth of the server's RSS over the row, the sessions still open after it, the CPU time of
the server's event-loop thread and of the whole server, and, if the server exports the histogram
``swarm_chat_gc_pause_seconds``, the bucket bound of the longest full garbage collection in the
row. Goals, for every row: ``/health`` p99 < 100 ms, event-loop lag p99 <= 50 ms, RSS growth
< 50 MB, 0 sessions left open; for an attack row, its stream p99 gap at most 1.5x its control
row's. Prints the figures with their goals, then a Markdown table (one line per row) for the
README, and exits with status 1 if a goal is missed. The whole run takes about 5 minutes on 2
cores.

With ``--pinned``, the server, the swarm (its nodes, DHT processes and p2p daemons), this
process (the legitimate client) and the prober run on every CPU but the last (core 0 of 2), and
the attacker alone on the last one (core 1): the attacker's own work no longer takes CPU from
the server, while the legitimate client and the prober, light as they are, share the server's.
Everything is pinned before it starts (children inherit their parent's CPUs); the bench checks
every thread of every process afterwards.

    .venv/bin/python bench/abuse.py [--seconds 10] [--rows "queue flood,slow readers"] [--pinned] [--log-dir DIR]
"""

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import fcntl
import itertools
import json
import logging
import multiprocessing
import os
import signal
import socket
import struct
import sys
import tempfile
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Counter, Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402
import tornado.httpclient  # noqa: E402
import tornado.websocket  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.abuse_probes import (  # noqa: E402
    CpuSample,
    HealthProber,
    HealthResult,
    bucket_quantile,
    buckets_of,
    describe_cpus,
    pin_self,
    pin_tree,
)
from bench.common import NEVER, PROMPT, percentile  # noqa: E402
from bench.load_clients import (  # noqa: E402
    PROMPT_TOKEN_ALLOWANCE,
    ProcessSample,
    scrape_open_sessions,
    wait_for_no_open_sessions,
)
from config import Settings  # noqa: E402
from model_specs import model_from_source  # noqa: E402
from sessions.request_rules import MAX_STOP_SEQUENCE_CHARS, MAX_STOP_SEQUENCES  # noqa: E402

# The attacks run in worker processes that import this module: what pulls in torch and petals
# (swarm.*, and bench.common's model and swarm helpers when called) is used inside main() only.

BASELINE = "baseline"
LONG_STOP_STRINGS = "long stop strings"
QUEUE_FLOOD = "queue flood"
LARGE_BODIES = "large bodies"
SESSIONLESS_SOCKETS = "sessionless sockets"
SLOW_READERS = "slow readers"
MANY_SESSIONS = "many sessions from one address"
GRAMMAR_BOMB = "grammar bomb"
TOKENIZATION_FLOOD = "tokenization flood"
FORGED_PROXY_HEADERS = "forged proxy headers"
HUNG_SWARM_SERVER = "hung swarm server"
# The hung swarm server last: a node frozen and thawed may still be routed around after the row.
ROWS = (BASELINE, LONG_STOP_STRINGS, QUEUE_FLOOD, LARGE_BODIES, SESSIONLESS_SOCKETS, SLOW_READERS, MANY_SESSIONS,
        GRAMMAR_BOMB, TOKENIZATION_FLOOD, FORGED_PROXY_HEADERS, HUNG_SWARM_SERVER)
CONTROL = " (control)"  # appended to an attack's name for its control row

HEALTH_P99_GOAL_MS = 100.0
LOOP_LAG_P99_GOAL_MS = 50.0
GAP_RATIO_GOAL = 1.5
RSS_GROWTH_GOAL_MB = 50.0
MB = 1024 * 1024

REPLY_TIMEOUT = 60.0
FIRST_TOKEN_TIMEOUT = 60.0
SETTLE_TIMEOUT = 60.0
# After the last session is released: lets the server finish freeing what the row left.
SETTLE_SECONDS = 1.0
WARM_UP_SECONDS = 3.0
REQUEST_TIMEOUT = 5  # the server's --request-timeout: a frozen node is given up on within the row
NODES = 2
ATTENTION_CACHE_TOKENS = 65536  # per node: every session of every row at full length, with room to spare
NORMAL_SESSION_LENGTH = 2048
GENERATED_TOKENS_METRIC = "swarm_chat_generated_tokens"
SESSIONS_OPENED_METRIC = "swarm_chat_sessions_opened"
GC_PAUSE_METRIC = "swarm_chat_gc_pause_seconds"  # a histogram; only generation "2" if it has that label
LOOP_LAG_METRIC = "swarm_chat_event_loop_lag_seconds"  # a histogram, sampled every 100 ms
ERRORS_METRIC = "swarm_chat_errors"  # error replies by code

# Where each attack comes from. 127.0.0.0/8 is all loopback, so these reach the server on
# 127.0.0.1 as distinct clients.
STOP_STRINGS_ADDRESS = "127.0.0.2"
QUEUE_FLOOD_ADDRESS = "127.0.0.3"
LARGE_BODIES_ADDRESS = "127.0.0.4"
SLOW_READERS_ADDRESS = "127.0.0.5"
MANY_SESSIONS_ADDRESS = "127.0.0.6"
HUNG_SWARM_ADDRESS = "127.0.0.7"
GRAMMAR_BOMB_ADDRESS = "127.0.0.8"
FORGED_HEADERS_ADDRESS = "127.0.0.9"
TOKENIZATION_ADDRESS = "127.0.0.10"
SESSIONLESS_ADDRESSES = [f"127.0.1.{host}" for host in range(1, 33)]

HUGE_STOP_CHARS = 100_000
ONE_TOKEN_STOP = "<|im_end|>"  # a special token of the tiny Llama's tokenizer
STOP_STRING_CLIENTS = 4
STOP_STRING_TOKENS = 24

LARGE_BODY_CLIENTS = 4
BODY_CHUNK = b"x" * MB
ANSWER_TIMEOUT = 10.0

SESSIONLESS_EXTRA_PER_ADDRESS = 4  # attempts past the per-client connection limit, to see them refused
CONNECT_CONCURRENCY = 100

SLOW_READERS_COUNT = 8
SLOW_READER_RECEIVE_BUFFER = 4096  # small, so that the server's writes back up within the row
ECHOED_FIELD_CHARS = 200_000  # under --max-message-bytes (256 KiB), echoed whole in the error reply

MANY_SESSIONS_EXTRA = 16  # attempts past the per-client session limit
MANY_SESSIONS_LENGTH = 64

HUNG_SWARM_CLIENTS = 4
FREEZE_AFTER = 1.0  # seconds into the row: the attack's sessions are open and stepping by then
BUSIEST_SAMPLE = 1.0

GRAMMAR_BOMB_CLIENTS = 4
GRAMMAR_BOMB_LEVELS = 20  # each level's allOf refers twice to the one below: 2**20 copies written out
GRAMMAR_BOMB_TOKENS = 8

TOKENIZATION_CLIENTS = 200
TOKENIZATION_PROMPT_CHARS = 650_000  # a body of ~650 KB, under --max-body-bytes (1 MiB)
PROMPT_MARGIN_CHARS = 1000  # the other prompt: this much under the longest the server tokenizes

FORGED_EXTRA_CONNECTIONS = 16  # attempts past the per-client connection limit
FORGED_HTTP_REQUESTS = 8
FORGED_SESSION_LENGTH = 64

POLITE_SESSION_TOKENS = NORMAL_SESSION_LENGTH - PROMPT_TOKEN_ALLOWANCE  # the most one control session generates


def describe(error: BaseException) -> str:
    """A short, countable description of an exception."""
    return f"{type(error).__name__}: {str(error)[:80]}".rstrip(": ")


def reply_code(raw: Optional[str]) -> str:
    """How a WebSocket reply is counted: ``ok``, its error ``code``, or ``closed``."""
    if raw is None:
        return "closed"
    reply = json.loads(raw)
    return "ok" if reply.get("ok") else str(reply.get("code"))


def count_line(counts: Counter[str], limit: int = 10) -> str:
    """``n x what`` for the most frequent outcomes."""
    return ", ".join(f"{count} x {what}" for what, count in counts.most_common(limit)) or "nothing"


@dataclass(frozen=True)
class Target:
    """The server under attack and the limits it enforces."""

    base_url: str
    model: str
    seconds: float
    max_sessions_per_client: int
    max_connections_per_client: int
    longest_prompt_chars: int  # the longest prompt the server tokenizes rather than refuses unread

    @property
    def host(self) -> str:
        """The server's address."""
        return urlparse(self.base_url).hostname

    @property
    def port(self) -> int:
        """The server's port."""
        return urlparse(self.base_url).port

    @property
    def ws_url(self) -> str:
        """The WebSocket API's URL."""
        return self.base_url.replace("http://", "ws://").rstrip("/") + "/api/v2/generate"

    def url(self, path: str) -> str:
        """An HTTP URL of the server."""
        return self.base_url.rstrip("/") + path


@dataclass
class AttackOutcome:
    """What an attack did and what the server answered: counted outcomes and free-form notes."""

    counts: Counter[str] = field(default_factory=collections.Counter)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the tables."""
        return "; ".join(([count_line(self.counts)] if self.counts or not self.notes else []) + self.notes)


async def ws_connect(target: Target, source: Optional[str] = None,
                     on_message: Optional[Callable[[Optional[str]], None]] = None,
                     headers: Optional[Dict[str, str]] = None):
    """A WebSocket connection to the API from ``source`` (an address of this machine)."""
    request = tornado.httpclient.HTTPRequest(target.ws_url, connect_timeout=REPLY_TIMEOUT, headers=headers,
                                             request_timeout=REPLY_TIMEOUT, network_interface=source)
    return await tornado.websocket.websocket_connect(request, on_message_callback=on_message)


async def ws_request(connection, message: dict) -> Optional[str]:
    """Sends ``message`` and returns the next reply (None: the connection closed)."""
    await connection.write_message(json.dumps(message))
    return await asyncio.wait_for(connection.read_message(), REPLY_TIMEOUT)


async def open_session(target: Target, source: str, max_length: int):
    """A connection from ``source`` and the code its ``open_inference_session`` got."""
    connection = await ws_connect(target, source)
    reply = await ws_request(connection, {"type": "open_inference_session", "model": target.model,
                                          "max_length": max_length})
    return connection, reply_code(reply)


# --- long stop strings -------------------------------------------------------------------------

async def _post_json(client: tornado.httpclient.AsyncHTTPClient, target: Target, source: str, path: str,
                     body: dict, headers: Optional[Dict[str, str]] = None) -> tornado.httpclient.HTTPResponse:
    return await client.fetch(target.url(path), method="POST", body=json.dumps(body), raise_error=False,
                              headers={"Content-Type": "application/json", **(headers or {})},
                              network_interface=source, request_timeout=REPLY_TIMEOUT)


def answer_code(status: int, body: bytes) -> str:
    """How an HTTP answer is counted: ``200``, or the status and the error code of a refusal."""
    if status == 200:
        return "200"
    try:
        answer = json.loads(body)
    except ValueError:
        return str(status)
    if not isinstance(answer, dict):
        return str(status)
    error = answer.get("error") if isinstance(answer.get("error"), dict) else answer  # OpenAI's shape, or ours
    return f"{status} {error.get('code')}"


async def _post_outcome(client: tornado.httpclient.AsyncHTTPClient, target: Target, source: str, path: str,
                        body: dict, headers: Optional[Dict[str, str]] = None) -> str:
    """POSTs ``body`` as JSON; returns the status, and the error code of a refusal."""
    response = await _post_json(client, target, source, path, body, headers)
    if response.code == 599:
        return describe(response.error)
    return answer_code(response.code, response.body)


async def _ws_generation(target: Target, source: str, request: dict) -> str:
    """One generation in a session of its own; returns ``ok`` or the error code that ended it."""
    connection, code = await open_session(target, source, PROMPT_TOKEN_ALLOWANCE + 2 * STOP_STRING_TOKENS)
    try:
        if code != "ok":
            return f"open: {code}"
        await connection.write_message(json.dumps(dict(request, type="generate", inputs=PROMPT)))
        while True:
            raw = await asyncio.wait_for(connection.read_message(), REPLY_TIMEOUT)
            code = reply_code(raw)
            if code != "ok" or json.loads(raw)["stop"]:
                return code
    finally:
        connection.close()


async def attack_long_stop_strings(target: Target) -> AttackOutcome:
    """Stop strings over every limit, and as many and as long as allowed, from a few concurrent clients."""
    outcome = AttackOutcome()
    source = STOP_STRINGS_ADDRESS
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=STOP_STRING_CLIENTS + 1)
    # The greedy text the model writes for PROMPT: stop strings that begin with it keep the whole
    # reply held back as a possible stop until the end.
    learned = await _post_json(client, target, source, "/v1/completions", {
        "model": target.model, "prompt": PROMPT, "max_tokens": STOP_STRING_TOKENS, "temperature": 0})
    written = json.loads(learned.body)["choices"][0]["text"]

    def maximal(count: int, chars: int = MAX_STOP_SEQUENCE_CHARS) -> List[str]:
        return [(written + f"<{index}>" + "#" * chars)[:chars] for index in range(count)]

    huge = ["y" * HUGE_STOP_CHARS + str(index) for index in range(MAX_STOP_SEQUENCES)]
    completion = {"model": target.model, "prompt": PROMPT, "max_tokens": STOP_STRING_TOKENS, "temperature": 0}
    streamed = {"max_new_tokens": 1, "stop_sequence": ONE_TOKEN_STOP, "visible_text": True,
                "max_length": PROMPT_TOKEN_ALLOWANCE + STOP_STRING_TOKENS}
    variants: Dict[str, Callable[[], Awaitable[str]]] = {
        # /v1 takes as many stop strings as the WebSocket (sessions/request_rules.py): 4 of 100 KB are
        # each too long (16 would be a body over the limit, refused unread), 17 are too many.
        "/v1 4 x 100 KB": lambda: _post_outcome(client, target, source, "/v1/completions",
                                               dict(completion, stop=huge[:4])),
        "/v1 17 x 1000 chars": lambda: _post_outcome(client, target, source, "/v1/completions",
                                                    dict(completion, stop=maximal(MAX_STOP_SEQUENCES + 1))),
        # /api/v1/generate takes no stop strings: the fields are ignored, the body is parsed all the same.
        "/api/v1/generate 9 x 100 KB": lambda: _post_outcome(client, target, source, "/api/v1/generate", {
            "model": target.model, "inputs": PROMPT, "max_new_tokens": 4, "stop_sequence": ONE_TOKEN_STOP,
            "extra_stop_sequences": huge[:9]}),
        "WebSocket 17 x 1000 chars": lambda: _ws_generation(target, source, dict(
            streamed, extra_stop_sequences=maximal(MAX_STOP_SEQUENCES))),
        "WebSocket 2 x 100 KB": lambda: _ws_generation(target, source, dict(
            streamed, extra_stop_sequences=huge[:2])),
        # /v1/completions adds the end-of-sequence token's text to the request's stop strings.
        "/v1 15 x 1000 chars, streamed (allowed)": lambda: _post_outcome(
            client, target, source, "/v1/completions",
            dict(completion, stop=maximal(MAX_STOP_SEQUENCES - 1), stream=True)),
        "WebSocket 16 x 1000 chars, visible_text (allowed)": lambda: _ws_generation(target, source, dict(
            streamed, extra_stop_sequences=maximal(MAX_STOP_SEQUENCES - 1))),
    }
    turns = itertools.cycle(variants.items())
    deadline = time.monotonic() + target.seconds

    async def attacker() -> None:
        while time.monotonic() < deadline:
            name, send = next(turns)
            try:
                outcome.counts[f"{name}: {await send()}"] += 1
            except Exception as error:
                outcome.counts[f"{name}: {describe(error)}"] += 1

    try:
        await asyncio.gather(*(attacker() for _ in range(STOP_STRING_CLIENTS)))
    finally:
        client.close()
    outcome.notes.append(f"{sum(outcome.counts.values())} requests")
    return outcome


# --- queue flood -------------------------------------------------------------------------------

async def attack_queue_flood(target: Target) -> AttackOutcome:
    """One session sending one-token ``generate`` frames as fast as the socket takes them; each
    frame the server reads gets a reply, so the replies count the frames it read."""
    outcome = AttackOutcome()
    replies: Counter[str] = collections.Counter()
    connection, code = await open_session(target, QUEUE_FLOOD_ADDRESS, NORMAL_SESSION_LENGTH)
    if code != "ok":
        outcome.counts[f"open: {code}"] += 1
        connection.close()
        return outcome
    frame = json.dumps({"type": "generate", "inputs": " x", "max_new_tokens": 1})

    async def read_replies() -> None:
        while True:
            raw = await connection.read_message()
            if raw is None:
                return
            replies[reply_code(raw)] += 1

    reader = asyncio.create_task(read_replies())
    sent = 0
    deadline = time.monotonic() + target.seconds
    try:
        while time.monotonic() < deadline:
            # A write waits while the socket's buffers are full: the server reads no faster than its
            # rate. One still waiting at the end is left to fail when the connection closes (a
            # cancelled write makes Tornado log an error).
            write = asyncio.ensure_future(connection.write_message(frame))
            write.add_done_callback(lambda done: done.cancelled() or done.exception())
            await asyncio.wait([write], timeout=deadline - time.monotonic())
            if not write.done():
                outcome.notes.append("the last write was still waiting at the end")
                break
            write.result()
            sent += 1
            if sent % 100 == 0:
                await asyncio.sleep(0)  # let the reader count
    except tornado.websocket.WebSocketClosedError:
        outcome.notes.append(f"the server closed the socket (code {connection.close_code})")
    finally:
        answered = sum(replies.values())  # before closing: what the server read within the row
        connection.close()
        await asyncio.wait_for(reader, REPLY_TIMEOUT)
    outcome.counts.update({f"reply {code}": count for code, count in replies.items()})
    outcome.notes.insert(0, f"{sent} generate frames sent, {answered} answered within the row")
    return outcome


# --- large bodies ------------------------------------------------------------------------------

async def _end_upload(sender: asyncio.Task, writer: asyncio.StreamWriter) -> None:
    """Stops a body still being sent and closes its connection."""
    sender.cancel()
    writer.close()
    try:
        await sender
    except (asyncio.CancelledError, OSError):
        pass  # the server closed the connection mid-body, or the answer came first: both end the upload


async def _large_body(target: Target, path: str, size: int, chunked: bool) -> Tuple[str, float]:
    """One POST of a ``size``-byte body; returns (what the server answered, MB written until then)."""
    reader, writer = await asyncio.open_connection(target.host, target.port, local_addr=(LARGE_BODIES_ADDRESS, 0))
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                  f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode())
    written = 0

    async def send_body() -> None:
        nonlocal written
        chunk_header = f"{len(BODY_CHUNK):x}\r\n".encode()
        while written < size:
            writer.write(chunk_header + BODY_CHUNK + b"\r\n" if chunked else BODY_CHUNK)
            await writer.drain()
            written += len(BODY_CHUNK)
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    sender = asyncio.create_task(send_body())
    try:
        status_line = await asyncio.wait_for(reader.readline(), ANSWER_TIMEOUT)
        answer = " ".join(status_line.decode(errors="replace").split()[1:2]) or "closed without an answer"
    except asyncio.TimeoutError:
        answer = f"no answer in {ANSWER_TIMEOUT:.0f} s"
    except OSError as error:
        answer = describe(error)
    finally:
        await _end_upload(sender, writer)
    return answer, written / MB


async def attack_large_bodies(target: Target) -> AttackOutcome:
    """50-100 MB bodies to the generation endpoints, announced by Content-Length or chunked."""
    outcome = AttackOutcome()
    uploads = itertools.cycle([
        ("/v1/chat/completions", 100 * MB, False),
        ("/api/v1/generate", 50 * MB, False),
        ("/v1/chat/completions", 100 * MB, True),
        ("/api/v1/generate", 100 * MB, True),
    ])
    most_written: Dict[str, float] = collections.defaultdict(float)
    deadline = time.monotonic() + target.seconds

    async def uploader() -> None:
        while time.monotonic() < deadline:
            path, size, chunked = next(uploads)
            name = f"{path} {'chunked' if chunked else f'{size // MB} MB'}"
            try:
                answer, written_mb = await _large_body(target, path, size, chunked)
            except OSError as error:
                answer, written_mb = describe(error), 0.0
            outcome.counts[f"{name}: {answer}"] += 1
            most_written[name] = max(most_written[name], written_mb)

    await asyncio.gather(*(uploader() for _ in range(LARGE_BODY_CLIENTS)))
    outcome.notes.append("most MB written before the answer: " +
                         ", ".join(f"{name} {mb:.0f}" for name, mb in most_written.items()))
    return outcome


# --- sessionless sockets -----------------------------------------------------------------------

async def attack_sessionless_sockets(target: Target) -> AttackOutcome:
    """As many WebSockets as the per-client limit allows from each of 32 addresses (and a few
    more, to be refused), none of which ever sends a frame; held to the end of the row."""
    outcome = AttackOutcome()
    held = []  # (connection, what the server sent it: an error code, or that it closed it)
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    started = time.monotonic()
    deadline = started + target.seconds

    async def connect(source: str) -> None:
        async with gate:
            if time.monotonic() >= deadline:
                return
            answers: List[str] = []
            try:
                connection = await ws_connect(target, source, on_message=lambda raw: answers.append(
                    "closed by the server" if raw is None else reply_code(raw)))
            except Exception as error:
                outcome.counts[f"connect failed: {describe(error)}"] += 1
                return
            held.append((connection, answers))

    attempts = target.max_connections_per_client + SESSIONLESS_EXTRA_PER_ADDRESS
    await asyncio.gather(*(connect(source) for source in SESSIONLESS_ADDRESSES for _ in range(attempts)))
    opened = time.monotonic()
    await asyncio.sleep(max(0.0, deadline - opened))
    for connection, answers in held:
        if answers:
            outcome.counts[answers[0]] += 1
        else:
            outcome.counts["held open to the end" if connection.close_code is None else "closed"] += 1
        connection.close()
    outcome.notes.append(f"{len(SESSIONLESS_ADDRESSES) * attempts} attempts from {len(SESSIONLESS_ADDRESSES)} "
                         f"addresses, {len(held)} handshakes, done {opened - started:.1f} s into the row")
    return outcome


# --- slow readers ------------------------------------------------------------------------------

def masked_text_frame(text: str) -> bytes:
    """A client's WebSocket text frame (clients must mask theirs)."""
    payload = text.encode()
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    return header + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))


async def _receive_until(loop, sock: socket.socket, buffer: bytearray, enough: Callable[[bytearray], int]) -> bytes:
    """Reads until ``enough(buffer)`` says how many bytes make the item; returns them, keeping the rest."""
    while True:
        size = enough(buffer)
        if size:
            item = bytes(buffer[:size])
            del buffer[:size]
            return item
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), REPLY_TIMEOUT)
        if not data:
            raise ConnectionError("closed by the server")
        buffer += data


def _handshake_size(buffer: bytearray) -> int:
    end = buffer.find(b"\r\n\r\n")
    return end + 4 if end >= 0 else 0


def _frame_size(buffer: bytearray) -> int:
    """The size of the server's (unmasked) frame at the start of ``buffer``, 0 if incomplete."""
    if len(buffer) < 2:
        return 0
    length, header = buffer[1] & 0x7F, 2
    if length == 126:
        if len(buffer) < 4:
            return 0
        length, header = struct.unpack("!H", buffer[2:4])[0], 4
    elif length == 127:
        if len(buffer) < 10:
            return 0
        length, header = struct.unpack("!Q", buffer[2:10])[0], 10
    return header + length if len(buffer) >= header + length else 0


async def _slow_reader(target: Target) -> socket.socket:
    """A socket that opened a session and started a long streamed generation; it is never read again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_READER_RECEIVE_BUFFER)  # before connect: sets the window
    sock.setblocking(False)
    try:
        sock.bind((SLOW_READERS_ADDRESS, 0))
        await loop.sock_connect(sock, (target.host, target.port))
        key = base64.b64encode(os.urandom(16)).decode()
        await loop.sock_sendall(sock, (f"GET /api/v2/generate HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                                       f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                       "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        buffer = bytearray()
        response = await _receive_until(loop, sock, buffer, _handshake_size)
        if b" 101 " not in response.split(b"\r\n")[0]:
            raise ConnectionError(f"handshake refused: {response.splitlines()[0]!r}")
        await loop.sock_sendall(sock, masked_text_frame(json.dumps({
            "type": "open_inference_session", "model": target.model, "max_length": NORMAL_SESSION_LENGTH})))
        frame = await _receive_until(loop, sock, buffer, _frame_size)
        if b'"ok": true' not in frame:
            raise ConnectionError(f"session refused: {frame[2:200]!r}")
        await loop.sock_sendall(sock, masked_text_frame(json.dumps({
            "type": "generate", "inputs": PROMPT, "max_new_tokens": 1, "stop_sequence": NEVER,
            "max_length": NORMAL_SESSION_LENGTH, "visible_text": True})))
    except BaseException:
        sock.close()
        raise
    return sock


def proc_net_address(address: str, port: int) -> str:
    """An IPv4 address and port as Linux's /proc/net/tcp writes them."""
    return f"{struct.unpack('=I', socket.inet_aton(address))[0]:08X}:{port:04X}"


def server_send_queues(target: Target, client_address: str) -> List[int]:
    """Bytes the server's kernel holds, unsent or unacknowledged, on each of its connections to
    ``client_address`` (from /proc/net/tcp: both ends are on this machine)."""
    server_end = proc_net_address(socket.gethostbyname(target.host), target.port)
    client_prefix = proc_net_address(client_address, 0)[:-4]
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == server_end and fields[2].startswith(client_prefix):
            queues.append(int(fields[4].split(":")[0], 16))
    return queues


def unread_bytes(sock: socket.socket) -> int:
    """Bytes received by the kernel for ``sock`` and not yet read."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


async def _echo_pump(loop, sock: socket.socket, frame: bytes, deadline: float) -> int:
    """Sends ``frame`` over and over until the deadline, or until the socket takes no more;
    returns how many were sent whole."""
    sent = 0
    try:
        while time.monotonic() < deadline:
            await asyncio.wait_for(loop.sock_sendall(sock, frame), deadline - time.monotonic())
            sent += 1
    except (asyncio.TimeoutError, OSError):
        pass  # the deadline came while the socket's buffers were full, or the server closed it
    return sent


async def attack_slow_readers(target: Target) -> AttackOutcome:
    """Several long streamed generations on sockets that are never read once the generation starts.

    A token's reply is ~100 bytes, and the kernel's buffers on loopback hold megabytes, so each
    socket also sends frames whose error reply echoes a 200 KB field: the server has megabytes
    to write into sockets nobody reads, within the row.
    """
    outcome = AttackOutcome()
    loop = asyncio.get_running_loop()
    started = await asyncio.gather(*(_slow_reader(target) for _ in range(SLOW_READERS_COUNT)),
                                   return_exceptions=True)
    sockets = [sock for sock in started if isinstance(sock, socket.socket)]
    outcome.counts.update(describe(error) for error in started if not isinstance(error, socket.socket))
    outcome.counts["generations left unread"] += len(sockets)
    echoed = masked_text_frame(json.dumps({"type": "generate", "max_new_tokens": "x" * ECHOED_FIELD_CHARS}))
    deadline = time.monotonic() + target.seconds
    frames_sent = await asyncio.gather(*(_echo_pump(loop, sock, echoed, deadline) for sock in sockets))
    unread = [unread_bytes(sock) for sock in sockets]
    queued = server_send_queues(target, SLOW_READERS_ADDRESS)
    for sock in sockets:
        sock.close()
    if sockets:
        outcome.notes.append(f"{min(frames_sent)}-{max(frames_sent)} echoed frames of "
                             f"{len(echoed) // 1024} KB sent per socket before its sends blocked or the row ended")
        outcome.notes.append(f"per socket at the end: {min(unread) // 1024}-{max(unread) // 1024} KB unread, "
                             f"{min(queued, default=0) / MB:.1f}-{max(queued, default=0) / MB:.1f} MB in the "
                             "server's send queue")
    return outcome


# --- many sessions from one address ------------------------------------------------------------

async def attack_many_sessions(target: Target) -> AttackOutcome:
    """Sessions from one address up to and past ``--max-sessions-per-client``, held idle."""
    outcome = AttackOutcome()
    held = []
    deadline = time.monotonic() + target.seconds
    for _ in range(target.max_sessions_per_client + MANY_SESSIONS_EXTRA):
        try:
            connection, code = await open_session(target, MANY_SESSIONS_ADDRESS, MANY_SESSIONS_LENGTH)
        except Exception as error:
            outcome.counts[f"open: {describe(error)}"] += 1
            continue
        outcome.counts[f"open: {code}"] += 1
        if code == "ok":
            held.append(connection)
        else:
            connection.close()
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    outcome.counts["sessions held idle to the end"] += sum(1 for connection in held if connection.close_code is None)
    for connection in held:
        connection.close()
    return outcome


# --- grammar bomb ------------------------------------------------------------------------------

def bomb_schema(levels: int = GRAMMAR_BOMB_LEVELS) -> dict:
    """A JSON schema whose ``$defs`` nest ``allOf`` of two ``$ref`` to the level below, ``levels`` deep:
    small as text, 2**levels copies of the bottom object once every reference is written out."""
    definitions = {"l0": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                          "required": ["a"]}}
    for level in range(1, levels + 1):
        below = {"$ref": f"#/$defs/l{level - 1}"}
        definitions[f"l{level}"] = {"allOf": [below, dict(below)]}
    return {"$defs": definitions, "$ref": f"#/$defs/l{levels}"}


async def attack_grammar_bomb(target: Target) -> AttackOutcome:
    """The compile bomb as ``response_format``'s JSON schema and as a tool's parameters, sent over
    and over by a few concurrent clients."""
    outcome = AttackOutcome()
    schema = bomb_schema()
    chat = {"model": target.model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": GRAMMAR_BOMB_TOKENS}
    bodies = itertools.cycle([
        ("response_format", dict(chat, response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": schema}})),
        ("tools", dict(chat, tools=[{"type": "function", "function": {"name": "x", "parameters": schema}}],
                       tool_choice="required")),
    ])
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=GRAMMAR_BOMB_CLIENTS)
    deadline = time.monotonic() + target.seconds

    async def attacker() -> None:
        while time.monotonic() < deadline:
            name, body = next(bodies)
            try:
                answer = await _post_outcome(client, target, GRAMMAR_BOMB_ADDRESS, "/v1/chat/completions", body)
            except Exception as error:
                answer = describe(error)
            outcome.counts[f"{name}: {answer}"] += 1

    try:
        await asyncio.gather(*(attacker() for _ in range(GRAMMAR_BOMB_CLIENTS)))
    finally:
        client.close()
    outcome.notes.append(f"{sum(outcome.counts.values())} requests of {len(json.dumps(schema)):,} bytes of schema, "
                         f"{GRAMMAR_BOMB_LEVELS} levels")
    return outcome


# --- tokenization flood ------------------------------------------------------------------------

async def _read_answer(reader: asyncio.StreamReader) -> Tuple[int, bytes]:
    """An HTTP/1.1 answer's status and body (by its Content-Length)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed without an answer")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def raw_post(target: Target, source: str, path: str, body: bytes) -> str:
    """POSTs ``body`` (JSON) on a connection of its own while reading the answer, which may come
    before the body is sent whole; returns the answer as ``answer_code`` counts it."""
    reader, writer = await asyncio.open_connection(target.host, target.port, local_addr=(source, 0))
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode())

    async def send_body() -> None:
        for start in range(0, len(body), len(BODY_CHUNK)):
            writer.write(body[start:start + len(BODY_CHUNK)])
            await writer.drain()

    sender = asyncio.create_task(send_body())
    try:
        return answer_code(*await asyncio.wait_for(_read_answer(reader), REPLY_TIMEOUT))
    except asyncio.TimeoutError:
        return f"no answer in {REPLY_TIMEOUT:.0f} s"
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as error:
        return describe(error)
    finally:
        await _end_upload(sender, writer)


def long_prompt(chars: int) -> str:
    """Prose of exactly ``chars`` characters."""
    return ((PROMPT + " ") * (chars // (len(PROMPT) + 1) + 1))[:chars]


async def attack_tokenization_flood(target: Target) -> AttackOutcome:
    """About 200 concurrent ``/v1/completions`` of one token from one address, over and over:
    prompts of 650,000 characters, and of the longest that the server tokenizes (its model's
    longest session in its longest tokens' characters) rather than refuses unread."""
    outcome = AttackOutcome()
    prompts = [TOKENIZATION_PROMPT_CHARS, target.longest_prompt_chars]
    bodies = itertools.cycle([(f"{chars:,} chars", json.dumps({
        "model": target.model, "prompt": long_prompt(chars), "max_tokens": 1}).encode()) for chars in prompts])
    deadline = time.monotonic() + target.seconds

    async def attacker() -> None:
        while time.monotonic() < deadline:
            name, body = next(bodies)
            try:
                answer = await raw_post(target, TOKENIZATION_ADDRESS, "/v1/completions", body)
            except OSError as error:
                answer = describe(error)
            outcome.counts[f"{name}: {answer}"] += 1

    await asyncio.gather(*(attacker() for _ in range(TOKENIZATION_CLIENTS)))
    outcome.notes.append(f"{sum(outcome.counts.values())} requests, {TOKENIZATION_CLIENTS} at a time, from one address")
    return outcome


# --- forged proxy headers ----------------------------------------------------------------------

def forged_headers(index: int) -> Dict[str, str]:
    """Headers that name another client each time, as a proxy would: believed only from a trusted proxy."""
    address = f"10.{index // 250}.{index % 250}.1"
    return {"X-Forwarded-For": address, "X-Real-IP": address, "Forwarded": f"for={address}"}


async def _forged_socket(target: Target, index: int) -> Tuple[Optional[object], str]:
    """A WebSocket claiming to come for another client, which asks for a session; returns it
    (None if it was refused) and how the server answered."""
    connection = await ws_connect(target, FORGED_HEADERS_ADDRESS, headers=forged_headers(index))
    await connection.write_message(json.dumps({"type": "open_inference_session", "model": target.model,
                                               "max_length": FORGED_SESSION_LENGTH}))
    # A refused connection's first frame is its refusal, sent before the request is read.
    code = reply_code(await asyncio.wait_for(connection.read_message(), REPLY_TIMEOUT))
    if code == "too_many_connections" or code == "closed":
        connection.close()
        return None, f"connection: {code}"
    return connection, f"session: {code}"


async def attack_forged_proxy_headers(target: Target) -> AttackOutcome:
    """From one address the server does not trust as a proxy, WebSockets past the per-client
    connection limit, each asking for a session (past the session limit) and each naming a
    different client in ``X-Forwarded-For``, ``X-Real-IP`` and ``Forwarded``; then, with those
    sessions held, HTTP generations naming yet other clients. All held to the end of the row."""
    outcome = AttackOutcome()
    held = []
    deadline = time.monotonic() + target.seconds
    attempts = target.max_connections_per_client + FORGED_EXTRA_CONNECTIONS
    for index in range(attempts):
        try:
            connection, answer = await _forged_socket(target, index)
        except Exception as error:
            connection, answer = None, f"connection: {describe(error)}"
        outcome.counts[answer] += 1
        if connection is not None:
            held.append(connection)
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=FORGED_HTTP_REQUESTS)
    try:
        answers = await asyncio.gather(*(_post_outcome(
            client, target, FORGED_HEADERS_ADDRESS, "/v1/completions",
            {"model": target.model, "prompt": PROMPT, "max_tokens": 1}, forged_headers(attempts + index))
            for index in range(FORGED_HTTP_REQUESTS)))
    finally:
        client.close()
    outcome.counts.update(f"HTTP: {answer}" for answer in answers)
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    outcome.counts["connections held to the end"] += sum(1 for connection in held if connection.close_code is None)
    for connection in held:
        connection.close()
    outcome.notes.append(f"{attempts + FORGED_HTTP_REQUESTS} requests from {FORGED_HEADERS_ADDRESS}, each naming "
                         "another client in its headers")
    return outcome


# --- hung swarm server -------------------------------------------------------------------------

async def _generating_client(target: Target, deadline: float, outcome: AttackOutcome) -> None:
    """Streams tokens until the deadline, opening a new session after each error."""
    while time.monotonic() < deadline:
        try:
            connection, code = await open_session(target, HUNG_SWARM_ADDRESS, NORMAL_SESSION_LENGTH)
        except Exception as error:
            outcome.counts[f"open: {describe(error)}"] += 1
            await asyncio.sleep(0.5)
            continue
        try:
            if code != "ok":
                outcome.counts[f"open: {code}"] += 1
                await asyncio.sleep(0.5)
                continue
            await connection.write_message(json.dumps({
                "type": "generate", "inputs": PROMPT, "max_new_tokens": 1, "stop_sequence": NEVER,
                "max_length": NORMAL_SESSION_LENGTH}))
            while time.monotonic() < deadline:
                raw = await asyncio.wait_for(connection.read_message(), max(0.1, deadline - time.monotonic()))
                code = reply_code(raw)
                if code != "ok":
                    outcome.counts[f"generate: {code}"] += 1
                    break
                reply = json.loads(raw)
                outcome.counts["tokens"] += reply["token_count"]
                if reply["stop"]:
                    break
        except asyncio.TimeoutError:
            outcome.counts["waiting for a token at the end"] += 1
        finally:
            connection.close()


async def attack_hung_swarm_server(target: Target) -> AttackOutcome:
    """Several clients streaming while the bench freezes a swarm node (the freezing is done by
    the bench's own process, which owns the nodes)."""
    outcome = AttackOutcome()
    deadline = time.monotonic() + target.seconds
    await asyncio.gather(*(_generating_client(target, deadline, outcome) for _ in range(HUNG_SWARM_CLIENTS)))
    return outcome


# --- the control rows --------------------------------------------------------------------------

@dataclass(frozen=True)
class Work:
    """What the server did for a client over a row: the sessions it opened and the tokens it generated."""

    sessions: int
    tokens: int

    def __str__(self) -> str:
        return f"{self.tokens} tokens in {self.sessions} session{'' if self.sessions == 1 else 's'}"


async def _polite_session(target: Target, source: str, tokens: int) -> str:
    """A session of its own from ``source`` that generates ``tokens`` tokens in one reply (none:
    it is opened and closed); returns ``ok`` or the error code that ended it."""
    connection, code = await open_session(target, source, PROMPT_TOKEN_ALLOWANCE + max(1, tokens))
    try:
        if code != "ok" or not tokens:
            return code if code == "ok" else f"open: {code}"
        reply = await ws_request(connection, {"type": "generate", "inputs": PROMPT, "max_new_tokens": tokens})
        while reply_code(reply) == "ok" and not json.loads(reply)["stop"]:
            reply = await asyncio.wait_for(connection.read_message(), REPLY_TIMEOUT)
        return reply_code(reply)
    finally:
        connection.close()


async def polite_generations(target: Target, source: str, work: Work) -> AttackOutcome:
    """The attacker's ``work`` done politely from ``source`` over the row's seconds (or longer,
    if it takes longer): as many sessions as it had opened for it (more if one would be too
    long), started at evenly spaced times, each generating its share of the tokens in one reply."""
    outcome = AttackOutcome()
    started = time.monotonic()
    count = max(work.sessions, -(-work.tokens // POLITE_SESSION_TOKENS))
    if count:
        shares = [work.tokens // count + (index < work.tokens % count) for index in range(count)]
        spacing = target.seconds / count

        async def session(index: int, tokens: int) -> None:
            await asyncio.sleep(max(0.0, started + index * spacing - time.monotonic()))
            try:
                outcome.counts[await _polite_session(target, source, tokens)] += 1
            except Exception as error:
                outcome.counts[describe(error)] += 1

        await asyncio.gather(*(session(index, tokens) for index, tokens in enumerate(shares)))
        tokens = f"{min(shares)}" if min(shares) == max(shares) else f"{min(shares)}-{max(shares)}"
        outcome.notes.append(f"{count} sessions, one every {1000 * spacing:.0f} ms, each generating {tokens} "
                             "tokens in one reply" if count > 1 else f"1 session generating {tokens} tokens in one reply")
    else:
        outcome.notes.append("nothing to do: the server opened no session for the attacker")
    await asyncio.sleep(max(0.0, started + target.seconds - time.monotonic()))
    return outcome


ATTACKS: Dict[str, Callable[[Target], Awaitable[AttackOutcome]]] = {
    LONG_STOP_STRINGS: attack_long_stop_strings,
    QUEUE_FLOOD: attack_queue_flood,
    LARGE_BODIES: attack_large_bodies,
    SESSIONLESS_SOCKETS: attack_sessionless_sockets,
    SLOW_READERS: attack_slow_readers,
    MANY_SESSIONS: attack_many_sessions,
    GRAMMAR_BOMB: attack_grammar_bomb,
    TOKENIZATION_FLOOD: attack_tokenization_flood,
    FORGED_PROXY_HEADERS: attack_forged_proxy_headers,
    HUNG_SWARM_SERVER: attack_hung_swarm_server,
}
# Where each attack comes from; its control row's polite client comes from there too.
SOURCES: Dict[str, str] = {
    LONG_STOP_STRINGS: STOP_STRINGS_ADDRESS,
    QUEUE_FLOOD: QUEUE_FLOOD_ADDRESS,
    LARGE_BODIES: LARGE_BODIES_ADDRESS,
    SESSIONLESS_SOCKETS: SESSIONLESS_ADDRESSES[0],
    SLOW_READERS: SLOW_READERS_ADDRESS,
    MANY_SESSIONS: MANY_SESSIONS_ADDRESS,
    GRAMMAR_BOMB: GRAMMAR_BOMB_ADDRESS,
    TOKENIZATION_FLOOD: TOKENIZATION_ADDRESS,
    FORGED_PROXY_HEADERS: FORGED_HEADERS_ADDRESS,
    HUNG_SWARM_SERVER: HUNG_SWARM_ADDRESS,
}


def run_attack(row: str, target: Target) -> AttackOutcome:
    """Runs one row's attack to its end (in a worker process)."""
    return asyncio.run(ATTACKS[row](target))


def run_control(row: str, target: Target, work: Work) -> AttackOutcome:
    """Runs the control row of attack ``row``: its ``work`` done politely (in a worker process)."""
    return asyncio.run(polite_generations(target, SOURCES[row], work))


# --- the legitimate client ---------------------------------------------------------------------

@dataclass
class NormalClientResult:
    """What the legitimate client saw during a row, and the ``/health`` polls beside it."""

    gaps_ms: List[float] = field(default_factory=list)
    tokens: int = 0
    sessions: int = 0
    errors: Counter[str] = field(default_factory=collections.Counter)
    health: HealthResult = field(default_factory=HealthResult)


class NormalClient:
    """One WebSocket stream, one token per reply.

    The gaps are between consecutive tokens, across sessions: the time a new session takes (the
    old one full, or broken by an error) is a gap the user waits through. At ``stop`` the time
    since the last token counts as a gap too, so that a stream stuck at the end shows.
    """

    def __init__(self, target: Target):
        self.target = target
        self.result = NormalClientResult()
        self.first_token = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped_at = 0.0
        self._connection = None

    def stop(self) -> None:
        """Ends the stream (its connection closes, which frees its session)."""
        self._stopped_at = time.monotonic()
        self._stopping.set()
        if self._connection is not None:
            self._connection.close()

    async def run(self) -> None:
        """Streams until ``stop``."""
        last_token: Optional[float] = None
        while not self._stopping.is_set():
            try:
                last_token = await self._one_session(last_token)
            except Exception as error:
                if not self._stopping.is_set():
                    self.result.errors[describe(error)] += 1
                    await asyncio.sleep(0.1)
        if last_token is not None:
            self.result.gaps_ms.append(1000 * max(0.0, self._stopped_at - last_token))

    async def _one_session(self, last_token: Optional[float]) -> Optional[float]:
        """Streams in one session until it is full or the client stops; returns the last token's time."""
        self._connection = connection = await ws_connect(self.target)
        if self._stopping.is_set():  # stopped while connecting
            connection.close()
            return last_token
        try:
            reply = await ws_request(connection, {"type": "open_inference_session", "model": self.target.model,
                                                  "max_length": NORMAL_SESSION_LENGTH})
            if reply_code(reply) != "ok":
                raise RuntimeError(f"open: {reply_code(reply)}")
            self.result.sessions += 1
            reply = await ws_request(connection, {"type": "generate", "inputs": PROMPT, "max_new_tokens": 1,
                                                  "stop_sequence": NEVER, "max_length": NORMAL_SESSION_LENGTH})
            while reply is not None:
                if reply_code(reply) != "ok":
                    raise RuntimeError(f"generate: {reply_code(reply)}")
                body = json.loads(reply)
                if body["token_count"]:
                    now = time.monotonic()
                    if last_token is not None:
                        self.result.gaps_ms.append(1000 * (now - last_token))
                    last_token = now
                    self.result.tokens += body["token_count"]
                    self.first_token.set()
                if body["stop"]:
                    break
                reply = await asyncio.wait_for(connection.read_message(), REPLY_TIMEOUT)
        finally:
            connection.close()
            self._connection = None
        return last_token


@contextlib.asynccontextmanager
async def streaming(target: Target, prober: Optional[HealthProber] = None) -> AsyncIterator[NormalClient]:
    """The legitimate client, and ``prober`` polling ``/health``, from the stream's first token
    until the block ends."""
    client = NormalClient(target)
    client_run = asyncio.create_task(client.run())
    polling = False
    try:
        await asyncio.wait_for(client.first_token.wait(), FIRST_TOKEN_TIMEOUT)
        if prober is not None:
            prober.start()
            polling = True
        yield client
    finally:
        client.stop()
        await client_run
        if polling:
            client.result.health = await asyncio.get_running_loop().run_in_executor(None, prober.stop)


# --- the bench's side of a row -----------------------------------------------------------------

@dataclass(frozen=True)
class ServerFigures:
    """What the server's /metrics says at one moment."""

    generated_tokens: float
    sessions_opened: float
    errors: Dict[str, float]  # error replies so far, by code
    # Cumulative bucket counts by bound in seconds, as Prometheus counts them; None if the server
    # does not export the histogram. Full garbage collections, and the event loop's lag.
    gc_pauses: Optional[Dict[float, float]]
    loop_lag: Optional[Dict[float, float]]

    @classmethod
    async def scrape(cls, base_url: str) -> "ServerFigures":
        """The figures of the server at ``base_url`` now."""
        response = await tornado.httpclient.AsyncHTTPClient().fetch(base_url.rstrip("/") + "/metrics")
        families = {family.name: family for family in text_string_to_metric_families(response.body.decode())}

        def total(name: str) -> float:
            return sum(sample.value for sample in families[name].samples if sample.name.endswith("_total"))

        errors = {sample.labels["code"]: sample.value for sample in families[ERRORS_METRIC].samples
                  if sample.name.endswith("_total")} if ERRORS_METRIC in families else {}

        def histogram(name: str, labels: Optional[Dict[str, str]] = None) -> Optional[Dict[float, float]]:
            family = families.get(name)
            return buckets_of(family, labels) if family is not None and family.type == "histogram" else None

        return cls(generated_tokens=total(GENERATED_TOKENS_METRIC), sessions_opened=total(SESSIONS_OPENED_METRIC),
                   errors=errors, gc_pauses=histogram(GC_PAUSE_METRIC, {"generation": "2"}),
                   loop_lag=histogram(LOOP_LAG_METRIC))

    def work_since(self, earlier: "ServerFigures", client: NormalClientResult) -> Work:
        """The sessions opened and tokens generated since ``earlier`` for others than ``client``
        (approximate: the legitimate stream's last token or two may be generated and never received,
        so tokens without any other session are its own)."""
        sessions = max(0, round(self.sessions_opened - earlier.sessions_opened) - client.sessions)
        tokens = max(0, round(self.generated_tokens - earlier.generated_tokens) - client.tokens)
        return Work(sessions, tokens if sessions else 0)

    def errors_since(self, earlier: "ServerFigures") -> Counter[str]:
        """The error replies since ``earlier``, by code."""
        return collections.Counter({code: round(count - earlier.errors.get(code, 0.0))
                                    for code, count in self.errors.items() if count > earlier.errors.get(code, 0.0)})

    def longest_gc_pause_since(self, earlier: "ServerFigures") -> Optional[float]:
        """The bucket bound under which every full collection since ``earlier`` fell, in seconds
        (0: there was none); None if the server does not export them."""
        if self.gc_pauses is None or earlier.gc_pauses is None:
            return None
        return bucket_quantile(self.gc_pauses, earlier.gc_pauses, 1.0) or 0.0

    def loop_lag_p99_since(self, earlier: "ServerFigures") -> Optional[float]:
        """The bucket bound under which 99% of the event loop's lag samples since ``earlier`` fell,
        in seconds; None if the server does not export them."""
        if self.loop_lag is None or earlier.loop_lag is None:
            return None
        return bucket_quantile(self.loop_lag, earlier.loop_lag, 0.99)


async def busiest(pids: Sequence[int], seconds: float) -> int:
    """The process among ``pids`` that used the most CPU over the next ``seconds``."""
    processes = [psutil.Process(pid) for pid in pids]
    before = [sum(process.cpu_times()[:2]) for process in processes]
    await asyncio.sleep(seconds)
    used = [sum(process.cpu_times()[:2]) - start for process, start in zip(processes, before)]
    return pids[used.index(max(used))]


async def freeze_busiest_node(node_pids: Sequence[int], seconds: float) -> str:
    """Freezes (SIGSTOP) the process group of the node doing the most work, from ``FREEZE_AFTER``
    seconds into the row to its end, then thaws it (SIGCONT); returns what it did."""
    await asyncio.sleep(FREEZE_AFTER)
    node = await busiest(node_pids, BUSIEST_SAMPLE)
    frozen_for = max(0.0, seconds - FREEZE_AFTER - BUSIEST_SAMPLE)
    os.killpg(node, signal.SIGSTOP)  # the node's process, its DHT and its p2p daemon: a frozen machine
    try:
        await asyncio.sleep(frozen_for)
    finally:
        os.killpg(node, signal.SIGCONT)
    return f"node {node_pids.index(node)} of {len(node_pids)} frozen for {frozen_for:.0f} s"


@dataclass(frozen=True)
class Bench:
    """What every row runs against and with: the server, its swarm, the attacker's process and the prober."""

    target: Target
    server_pid: int
    node_pids: Sequence[int]
    attackers: concurrent.futures.Executor
    prober: HealthProber


@dataclass
class RowResult:
    """One row's figures."""

    row: str  # the attack's name; a control row's ends with CONTROL
    attack: str  # what the attacker (or the polite client) did, and what the server answered
    client: NormalClientResult
    rss_before: int
    rss_after: int
    open_after: int
    gc_pause_max: Optional[float]  # the bucket bound of the longest full collection, in seconds
    loop_lag_p99: Optional[float]  # the bucket bound of the event loop's p99 lag, in seconds
    work: Work  # done for the attacker, or for the polite client of a control row
    server_work: str  # the server process's CPU time and reads over the row, until the attack ended
    control: Optional["RowResult"] = None  # an attack row's control row, once it ran

    @property
    def health_p50_ms(self) -> float:
        """Median ``/health`` latency."""
        return percentile(self.client.health.ms, 0.5)

    @property
    def health_p99_ms(self) -> float:
        """99th-percentile ``/health`` latency."""
        return percentile(self.client.health.ms, 0.99)

    @property
    def gap_p50_ms(self) -> float:
        """Median gap between the legitimate stream's tokens."""
        return percentile(self.client.gaps_ms, 0.5)

    @property
    def gap_p99_ms(self) -> float:
        """99th-percentile gap between the legitimate stream's tokens."""
        return percentile(self.client.gaps_ms, 0.99)

    @property
    def gc_pause_text(self) -> str:
        """The longest full garbage collection of the row, as the tables show it."""
        if self.gc_pause_max is None:
            return "-"
        return f"<= {1000 * self.gc_pause_max:g} ms" if self.gc_pause_max else "none"

    @property
    def loop_lag_text(self) -> str:
        """The event loop's p99 lag over the row, as the tables show it."""
        if self.loop_lag_p99 is None:
            return "-"
        return f"<= {1000 * self.loop_lag_p99:g} ms" if self.loop_lag_p99 != float("inf") else "> 2.5 s"

    @property
    def rss_growth_mb(self) -> float:
        """Growth of the server's RSS over the row."""
        return (self.rss_after - self.rss_before) / MB


async def run_row(row: str, bench: Bench, control_of: Optional[Work] = None) -> RowResult:
    """One row: the legitimate client and the attack beside it (or, given ``control_of``, attack
    ``row``'s control row: that work done politely), then the server's state once it settles."""
    loop = asyncio.get_running_loop()
    target = bench.target
    before = await ServerFigures.scrape(target.base_url)
    rss_before = ProcessSample.of(bench.server_pid).rss_bytes
    cpu_before = CpuSample.of(bench.server_pid)
    async with streaming(target, bench.prober) as client:
        notes = ["no attack"]
        if row == BASELINE:
            await asyncio.sleep(target.seconds)
        elif control_of is not None:
            outcome = await asyncio.wait_for(loop.run_in_executor(
                bench.attackers, run_control, row, target, control_of), target.seconds + 2 * REPLY_TIMEOUT)
            notes = [outcome.summary()]
        else:
            jobs = [loop.run_in_executor(bench.attackers, run_attack, row, target)]
            if row == HUNG_SWARM_SERVER:
                jobs.append(freeze_busiest_node(bench.node_pids, target.seconds))
            outcome, *extra = await asyncio.wait_for(asyncio.gather(*jobs), target.seconds + REPLY_TIMEOUT)
            notes = [outcome.summary(), *extra]
    server_work = CpuSample.of(bench.server_pid).since(cpu_before)
    client_result = client.result
    open_after = await wait_for_no_open_sessions(lambda: scrape_open_sessions(target.base_url), SETTLE_TIMEOUT)
    await asyncio.sleep(SETTLE_SECONDS)
    rss_after = ProcessSample.of(bench.server_pid).rss_bytes
    after = await ServerFigures.scrape(target.base_url)
    work = after.work_since(before, client_result)
    if row != BASELINE:
        notes.append(f"{work} for the {'polite client' if control_of is not None else 'attacker'}")
    errors = after.errors_since(before)
    if errors:
        notes.append(f"error replies counted by the server: {count_line(errors)}")
    return RowResult(row + (CONTROL if control_of is not None else ""), "; ".join(notes), client_result,
                     rss_before, rss_after, open_after, after.longest_gc_pause_since(before),
                     after.loop_lag_p99_since(before), work, server_work)


async def warm_up(target: Target) -> None:
    """The legitimate client for a few seconds, so that what the server allocates on first use is
    not counted in the baseline."""
    async with streaming(target):
        await asyncio.sleep(WARM_UP_SECONDS)
    await wait_for_no_open_sessions(lambda: scrape_open_sessions(target.base_url), SETTLE_TIMEOUT)


def print_row(result: RowResult) -> None:
    """A row's main figures as soon as it ends."""
    print(f"  {result.row}: health p99 {result.health_p99_ms:.1f} ms, loop lag p99 {result.loop_lag_text}, "
          f"gap p99 {result.gap_p99_ms:.1f} ms, RSS {result.rss_growth_mb:+.1f} MB, open after {result.open_after}; "
          f"{result.attack}", flush=True)


async def run_rows(rows: Sequence[str], bench: Bench) -> List[RowResult]:
    """Warms the server up, then runs ``rows`` in order, each attack followed by its control row,
    printing each as it ends."""
    await warm_up(bench.target)
    results = []
    for row in rows:
        print(f"{row}: {bench.target.seconds:g} s", flush=True)
        result = await run_row(row, bench)
        print_row(result)
        results.append(result)
        if row != BASELINE:
            result.control = await run_row(row, bench, control_of=result.work)
            print_row(result.control)
            results.append(result.control)
    return results


# --- the report --------------------------------------------------------------------------------

@dataclass
class RowVerdict:
    """A row's goals: each one met, missed, or not applicable (None)."""

    health: bool
    loop_lag: Optional[bool]
    gap_ratio: Optional[float]  # an attack row's p99 gap over its control row's
    gap: Optional[bool]
    rss: bool
    sessions: bool

    @classmethod
    def of(cls, result: RowResult) -> "RowVerdict":
        """Checks ``result`` against the goals."""
        ratio = None if result.control is None else result.gap_p99_ms / result.control.gap_p99_ms
        lag = None if result.loop_lag_p99 is None else 1000 * result.loop_lag_p99 <= LOOP_LAG_P99_GOAL_MS
        return cls(health=result.health_p99_ms < HEALTH_P99_GOAL_MS and not result.client.health.failures,
                   loop_lag=lag, gap_ratio=ratio, gap=None if ratio is None else ratio <= GAP_RATIO_GOAL,
                   rss=result.rss_growth_mb < RSS_GROWTH_GOAL_MB, sessions=result.open_after == 0)

    def missed(self) -> List[str]:
        """The goals missed."""
        goals = {"/health p99": self.health, "loop lag": self.loop_lag, "stream p99 gap": self.gap,
                 "RSS": self.rss, "sessions left": self.sessions}
        return [goal for goal, met in goals.items() if met is False]


def add_figures(report, result: RowResult, verdict: RowVerdict) -> None:
    """The row's lines of the figures table (``report`` is bench.load_soak's Report); what the
    attacker did is in the lines printed as the row ends and in the Markdown table."""
    name = result.row
    client = result.client
    health = f"{result.health_p50_ms:.1f} / {result.health_p99_ms:.1f} ms ({len(client.health.ms)} polls)"
    if client.health.failures:
        health += f", failed: {count_line(client.health.failures)}"
    report.add(f"{name}: /health p50 / p99", health, f"p99 < {HEALTH_P99_GOAL_MS:.0f} ms, no failure",
               verdict.health)
    report.add(f"{name}: event loop lag p99", result.loop_lag_text, f"<= {LOOP_LAG_P99_GOAL_MS:.0f} ms",
               verdict.loop_lag)
    report.add(f"{name}: stream p50 token gap", f"{result.gap_p50_ms:.1f} ms")
    gap = f"{result.gap_p99_ms:.1f} ms"
    if verdict.gap_ratio is not None:
        gap += f" ({verdict.gap_ratio:.2f}x its control's {result.control.gap_p99_ms:.1f} ms)"
    report.add(f"{name}: stream p99 token gap", gap, f"<= {GAP_RATIO_GOAL}x control" if verdict.gap is not None
               else "", verdict.gap)
    report.add(f"{name}: stream tokens, errors",
               f"{client.tokens}, {count_line(client.errors) if client.errors else 0}")
    report.add(f"{name}: server RSS before / after", f"{result.rss_before / MB:.1f} / {result.rss_after / MB:.1f} MB "
               f"({result.rss_growth_mb:+.1f})", f"< +{RSS_GROWTH_GOAL_MB:.0f} MB", verdict.rss)
    report.add(f"{name}: sessions left open", str(result.open_after), "0", verdict.sessions)
    report.add(f"{name}: server process", result.server_work)
    if result.gc_pause_max is not None:
        report.add(f"{name}: longest full GC pause", result.gc_pause_text)


def markdown_table(results: Sequence[RowResult], verdicts: Sequence[RowVerdict]) -> str:
    """One line per row, for the README (what each attack sent and got is in the lines printed
    as the rows end)."""
    header = ["row", "work done for the attacker (or the polite client)",
              f"`/health` p50 / p99 (p99 < {HEALTH_P99_GOAL_MS:.0f} ms)",
              f"loop lag p99 (<= {LOOP_LAG_P99_GOAL_MS:.0f} ms)", "stream p50 / p99 gap",
              f"p99 gap vs control (<= {GAP_RATIO_GOAL}x)", f"RSS change (< {RSS_GROWTH_GOAL_MB:.0f} MB)",
              "sessions left (0)", "goals"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result, verdict in zip(results, verdicts):
        cells = [result.row, "-" if result.row == BASELINE else str(result.work),
                 f"{result.health_p50_ms:.1f} / {result.health_p99_ms:.1f} ms", result.loop_lag_text,
                 f"{result.gap_p50_ms:.0f} / {result.gap_p99_ms:.0f} ms",
                 "-" if verdict.gap_ratio is None else f"{verdict.gap_ratio:.2f}x",
                 f"{result.rss_growth_mb:+.1f} MB", str(result.open_after),
                 "missed: " + ", ".join(verdict.missed()) if verdict.missed() else "met"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the program -------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each row's attack")
    parser.add_argument("--rows", default=",".join(ROWS[1:]),
                        help=f"comma-separated rows to run after the baseline (default: all): {', '.join(ROWS[1:])}")
    parser.add_argument("--pinned", action="store_true",
                        help="the server, its swarm, the legitimate client and the /health prober on every CPU "
                             "but the last, the attacker on the last one")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="keep the server's and the swarm's logs here (default: a temporary folder)")
    args = parser.parse_args()
    args.rows = [row.strip() for row in args.rows.split(",") if row.strip() and row.strip() != BASELINE]
    unknown = [row for row in args.rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows: {', '.join(unknown)}; known: {', '.join(ROWS)}")
    if args.seconds < FREEZE_AFTER + BUSIEST_SAMPLE + 1:
        parser.error(f"--seconds must be at least {FREEZE_AFTER + BUSIEST_SAMPLE + 1:g}")
    if args.pinned and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pinned needs at least 2 CPUs")
    args.rows = [BASELINE] + [row for row in ROWS if row in args.rows]  # the baseline first, then in order
    return args


def server_flags(defaults: Settings) -> List[str]:
    """The server's limits back at their defaults (bench.common.start_server raises them), a short request
    timeout, and no prefix reuse: each row ends with no session left open. No proxy is trusted
    (the default), so forged client headers must count for nothing."""
    return ["--max-sessions", str(defaults.max_sessions), "--max-connections", str(defaults.max_connections),
            "--max-sessions-per-client", str(defaults.max_sessions_per_client),
            "--max-connections-per-client", str(defaults.max_connections_per_client),
            "--request-timeout", str(REQUEST_TIMEOUT), "--warm-sessions", "0"]


def longest_tokenized_prompt(model_path: Path) -> int:
    """The longest prompt the server tokenizes for ``model_path`` rather than refusing it unread:
    its longest session in its longest tokens' characters (the server's own rule), less a margin."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    longest_token = max(len(token) for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    return model_from_source(str(model_path)).chat.max_session_length * longest_token - PROMPT_MARGIN_CHARS


def pin_server_side(server_cpus: Set[int], attacker_pid: int) -> str:
    """Puts this process and everything it started but the attacker (the swarm, the server, their
    DHT processes and p2p daemons, the prober) on ``server_cpus``; returns what it did. They
    inherited these CPUs when they started: this checks it and moves any thread that did not."""
    processes, moved = pin_tree(os.getpid(), server_cpus, skip=[attacker_pid])
    return (f"pinned: {processes} processes (this bench and its legitimate client, the /health prober, the swarm, "
            f"the server and their children) on {describe_cpus(server_cpus)} ({moved} threads had to be moved), "
            f"the attacker (pid {attacker_pid}) on {describe_cpus(os.sched_getaffinity(attacker_pid))}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    """Runs the bench; returns the exit status."""
    args = parse_args()
    from bench.common import local_swarm, log_tail, start_server, stop_server, tiny_llama_files
    from bench.load_soak import Report

    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    defaults = Settings()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, attacker_cpus = set(cpus[:-1]), {cpus[-1]}
    if args.pinned:
        pin_self(server_cpus)  # first: whatever starts from here on inherits it
    with tempfile.TemporaryDirectory() as workdir, concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=pin_self if args.pinned else None,
            initargs=(attacker_cpus,) if args.pinned else ()) as attackers:
        attacker_pid = attackers.submit(os.getpid).result()  # the worker exists before the first measurement
        log_dir = args.log_dir or Path(workdir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        spec, model_path = tiny_llama_files(Path(workdir))
        options = ["--attn-cache-tokens", str(ATTENTION_CACHE_TOKENS)]
        with local_swarm(spec, model_path, log_dir, nodes=NODES, node_options=options) as (running_swarm, _, nodes):
            server_log = log_dir / "server.log"
            server, base_url = start_server(model_path, running_swarm.initial_peers, server_log,
                                            extra_args=server_flags(defaults))
            try:
                prober = HealthProber(base_url)
                try:
                    print(f"server pid {server.pid} at {base_url}, swarm nodes pids "
                          f"{', '.join(str(node.process.pid) for node in nodes)}, attacker pid {attacker_pid}, "
                          f"/health prober pid {prober.process.pid}", flush=True)
                    if args.pinned:
                        print(pin_server_side(server_cpus, attacker_pid), flush=True)
                    target = Target(base_url, spec.key, args.seconds,
                                    defaults.max_sessions_per_client, defaults.max_connections_per_client,
                                    longest_tokenized_prompt(model_path))
                    bench = Bench(target, server.pid, [node.process.pid for node in nodes], attackers, prober)
                    results = asyncio.run(run_rows(args.rows, bench))
                finally:
                    prober.close()
            finally:
                stop_server(server)
        verdicts = [RowVerdict.of(result) for result in results]
        report = Report()
        for result, verdict in zip(results, verdicts):
            add_figures(report, result, verdict)
        print()
        report.print()
        print()
        print(markdown_table(results, verdicts))
        print()
        if report.missed:
            print(f"goals missed: {', '.join(report.missed)}")
            print(f"last lines of {server_log}:\n{log_tail(server_log)}")
            return 1
    print("every goal met")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
