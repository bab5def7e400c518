"""What the benchmarks share: a model on a local swarm, a server process, WebSocket streams, percentiles.

- Models: ``default_model_files`` (the default model, converted once into ``.models``) and
  ``tiny_llama_files`` (a 4-block random Llama with the default model's tokenizer).
- Swarms: ``local_swarm`` serves a model from nodes on this machine; ``default_model_on_a_local_swarm``
  also connects a client to it, as the server connects.
- Servers: ``start_server`` runs ``server.py`` as a process of its own, its session and
  connection limits raised far above any benchmark's load; ``stop_server`` ends it.
- Clients: ``connect``, ``request`` and ``websocket_stream`` (one generation streamed over the
  WebSocket API, its replies timed), and ``percentile``.

The benchmarks run as scripts (``.venv/bin/python bench/<name>.py``): each puts the repository
on ``sys.path`` before it imports this module. Importing it loads neither torch nor petals, since
``bench/abuse.py`` runs its attacks in worker processes that import it through
``bench/load_clients.py``: what needs them is imported by the function that uses it.
"""

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import tornado.websocket

from model_specs import ModelSpec, default_model, model_from_source

if TYPE_CHECKING:
    from swarm.local import LocalSwarm, SwarmModel, SwarmNode

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / ".models"  # where the default model is converted once and kept

PROMPT = "Once upon a time, in a small village by the sea,"
NEVER = "\u0000never\u0000"  # a stop sequence no model writes: a stream runs to its max_length or a stop

# Far above any benchmark's load: the benchmarks measure the server, not its limits (every
# client of a benchmark comes from 127.0.0.1).
SERVER_LIMIT = 100_000
RAISED_LIMITS = ("--max-sessions", str(SERVER_LIMIT), "--max-connections", str(SERVER_LIMIT),
                 "--max-sessions-per-client", str(SERVER_LIMIT), "--max-connections-per-client", str(SERVER_LIMIT))
SERVER_START_TIMEOUT = 300  # seconds
SERVER_STOP_TIMEOUT = 30  # seconds
READY_LINE = re.compile(r"ready: (http://\S+)")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


# --- models and swarms -----------------------------------------------------------------------------


def default_model_files() -> Tuple[ModelSpec, Path]:
    """The default model's spec and its converted folder under ``.models`` (converted on the first call)."""
    from swarm.default_model import ensure_default_model

    spec = default_model(MODELS_DIR)
    return spec, ensure_default_model(spec.path.parent)


def tiny_llama_files(workdir: Path) -> Tuple[ModelSpec, Path]:
    """A tiny random Llama (4 blocks, ``swarm.tiny_models``) built in ``workdir / "tiny-llama"``
    with the default model's tokenizer: its spec, as ``server.py --model <folder>`` declares it,
    and its folder."""
    from swarm.default_model import ensure_default_model
    from swarm.tiny_models import make_tiny_llama

    path = make_tiny_llama(Path(workdir) / "tiny-llama", ensure_default_model(MODELS_DIR))
    return model_from_source(str(path)), path


@contextlib.contextmanager
def local_swarm(spec: ModelSpec, path: Path, log_dir: Path, *, nodes: int = 1, split_blocks: bool = False,
                node_options: Sequence[str] = (), threads: int = 1,
                torch_dtype: str = "float32") -> Iterator[Tuple["LocalSwarm", "SwarmModel", List["SwarmNode"]]]:
    """The model in ``path`` served by ``nodes`` swarm nodes on this machine, under ``spec``'s
    swarm prefix, their logs in ``log_dir``: each node hosts every block, or with ``split_blocks``
    an equal share of them in order. ``node_options`` go to every node's petals server, ``threads``
    is each node's torch threads. Yields the running swarm, its ``SwarmModel`` and its nodes once
    every block is announced; stops the swarm on leaving."""
    from swarm.local import LocalSwarm, SwarmModel, count_blocks

    model = SwarmModel(str(path), spec.swarm_prefix, count_blocks(str(path)))
    with LocalSwarm(Path(log_dir), torch_dtype=torch_dtype, threads=threads) as running_swarm:
        started = []
        for index in range(nodes):
            blocks = (f"{index * model.num_blocks // nodes}:{(index + 1) * model.num_blocks // nodes}"
                      if split_blocks else None)
            started.append(running_swarm.add_node(model, blocks, extra_options=list(node_options)))
        running_swarm.wait_until_ready([model])
        yield running_swarm, model, started


@dataclass
class SwarmClient:
    """What ``default_model_on_a_local_swarm`` yields: the default model on a one-node swarm, and
    a client connected to it."""

    spec: ModelSpec
    path: Path  # the converted model's folder
    tokenizer: object
    loaded: object  # the server's client of the swarm (``sessions.models.load_model``)
    prompt_ids: List[int]  # the question's chat prompt
    model: "SwarmModel"
    node_threads: int  # torch threads of the swarm node (this process has torch.get_num_threads())


@contextlib.contextmanager
def default_model_on_a_local_swarm(question: str, torch_dtype: str = "float32", node_threads: int = 0,
                                   client_threads: int = 0) -> Iterator[SwarmClient]:
    """The default model on a one-node swarm of this machine, connected as the server connects:
    torch threads split between node and client as ``server.py`` splits them (``node_threads``
    and ``client_threads`` override its split when not 0), the node and the client in
    ``torch_dtype``; yields them with the tokenizer and ``question``'s chat prompt as token ids."""
    import torch
    from transformers import AutoTokenizer

    from server import split_cpu_threads
    from sessions.models import load_model

    node_threads, default_client_threads = split_cpu_threads(node_threads)
    torch.set_num_threads(client_threads or default_client_threads)
    spec, path = default_model_files()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    with tempfile.TemporaryDirectory() as log_dir, \
            local_swarm(spec, path, Path(log_dir), threads=node_threads, torch_dtype=torch_dtype) as (swarm, model, _):
        loaded = load_model(spec, swarm.initial_peers, device="cpu", torch_dtype=torch_dtype)
        try:
            yield SwarmClient(spec, path, tokenizer, loaded, prompt_ids, model, node_threads)
        finally:
            loaded.close()


# --- the server as a process -----------------------------------------------------------------------


def start_server(model_source, initial_peers: Sequence[str], log_path: Path, *, port: int = 0,
                 executor_workers: Optional[int] = None,
                 extra_args: Sequence[str] = ()) -> Tuple[subprocess.Popen, str]:
    """``server.py`` serving ``model_source`` from the swarm at ``initial_peers``, on ``port`` of
    127.0.0.1 (0: a free one), on the CPU in float32, its limits raised (``RAISED_LIMITS``) and its
    output in ``log_path``; returns the process and its URL once it is ready.

    ``extra_args`` go last on the server's command line, so they override the flags before them.
    """
    command = [sys.executable, "server.py", "--model", str(model_source), "--initial-peers", *initial_peers,
               "--port", str(port), "--host", "127.0.0.1", "--device", "cpu", "--torch-dtype", "float32",
               *RAISED_LIMITS]
    if executor_workers is not None:
        command += ["--executor-workers", str(executor_workers)]
    command += list(extra_args)
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    with open(log_path) as log:
        while time.monotonic() < deadline and process.poll() is None:
            line = log.readline()
            if not line:
                time.sleep(0.1)
                continue
            match = READY_LINE.search(line)
            if match:
                return process, match.group(1)
    stop_server(process)
    raise RuntimeError(f"the server did not start; last lines of {log_path}:\n{log_tail(log_path)}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (the server's clean shutdown), then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- WebSocket clients -----------------------------------------------------------------------------


async def connect(url: str) -> tornado.websocket.WebSocketClientConnection:
    """A WebSocket connection to ``url`` that takes replies of up to 1 MiB."""
    return await tornado.websocket.websocket_connect(url, max_message_size=1 << 20)


async def request(connection: tornado.websocket.WebSocketClientConnection, message: dict) -> dict:
    """Sends ``message`` and returns its reply; raises RuntimeError for an error reply."""
    await connection.write_message(json.dumps(message))
    reply = json.loads(await connection.read_message())
    if not reply["ok"]:
        raise RuntimeError(reply.get("traceback", reply))
    return reply


@dataclass
class StreamTiming:
    """One streamed generation as ``websocket_stream`` saw it (``time.perf_counter`` seconds)."""

    started: float  # before connecting
    replies: List[Tuple[float, int, str]] = field(default_factory=list)  # (received, token_count, outputs)
    tokens: int = 0
    ended: float = 0.0  # after the last reply read

    @property
    def gaps(self) -> List[float]:
        """Seconds from each reply to the next, for each next reply that brought tokens."""
        return [later - earlier for (earlier, _, _), (later, count, _) in zip(self.replies, self.replies[1:])
                if count]

    @property
    def first_text_seconds(self) -> float:
        """Seconds from connecting to the first reply with text."""
        return next(received for received, _, outputs in self.replies if outputs) - self.started

    @property
    def tokens_per_s_after_first(self) -> float:
        """Tokens after the first per second, from the first reply with text to the last reply."""
        return (self.tokens - 1) / (self.ended - self.started - self.first_text_seconds)


async def websocket_stream(url: str, model: str, inputs: str, *, session_length: int, max_length: int,
                           stop_sequence: str = NEVER, max_tokens: Optional[int] = None) -> StreamTiming:
    """One generation streamed over the WebSocket API at ``url``, one token per reply: connects,
    opens a session of ``session_length`` tokens, generates from ``inputs`` up to ``max_length``
    session tokens or ``stop_sequence`` (``max_new_tokens: 1`` with a stop sequence streams), and
    reads replies until the last or, with ``max_tokens``, until that many tokens came; closes.
    Raises RuntimeError for an error reply."""
    started = time.perf_counter()
    connection = await connect(url)
    try:
        await request(connection, {"type": "open_inference_session", "model": model, "max_length": session_length})
        await connection.write_message(json.dumps({
            "type": "generate", "inputs": inputs, "max_new_tokens": 1, "stop_sequence": stop_sequence,
            "max_length": max_length}))
        timing = StreamTiming(started)
        while True:
            reply = json.loads(await connection.read_message())
            if not reply["ok"]:
                raise RuntimeError(reply.get("traceback", reply))
            timing.replies.append((time.perf_counter(), reply["token_count"], reply["outputs"]))
            timing.tokens += reply["token_count"]
            if reply["stop"] or (max_tokens is not None and timing.tokens >= max_tokens):
                break
        timing.ended = time.perf_counter()
        return timing
    finally:
        connection.close()
