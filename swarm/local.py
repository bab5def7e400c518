"""A private Petals swarm on 127.0.0.1, owned by the process that starts it.

``LocalSwarm`` runs a bootstrap DHT node in this process (its address is the swarm's initial
peer, and it outlives any one server node) and one ``python -m swarm serve`` process per
``add_node``. ``wait_until_ready`` polls the DHT until every block of every model is announced
online, and ``stop`` ends every node and the DHT: SIGTERM for a clean shutdown, then SIGKILL
for the whole process group of a node that does not go in time.
"""

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from swarm.blocks import lookup_blocks
from swarm.petals_api import DHT

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"
# A fixed throughput skips petals' start-up benchmark, which also probes the internet.
NODE_THROUGHPUT = 1000.0
_PR_SET_PDEATHSIG = 1


class SwarmStartError(RuntimeError):
    """A node of the local swarm exited or did not announce its blocks in time."""


@dataclass(frozen=True)
class SwarmModel:
    """A model as the swarm knows it: where its weights are, its DHT prefix, its block count."""

    path: str
    dht_prefix: str
    num_blocks: int


@dataclass
class SwarmNode:
    """One running server process and the log file it writes."""

    model: SwarmModel
    process: subprocess.Popen
    log_path: Path
    block_indices: Optional[str]

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _die_with_parent() -> None:
    # Runs in the child before exec: a node must not outlive a server killed without cleanup.
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def count_blocks(model_path: str) -> int:
    """The number of transformer blocks of a model, from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    for attribute in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, attribute, None):
            return int(getattr(config, attribute))
    raise ValueError(f"cannot tell how many blocks {model_path} has")


class LocalSwarm:
    """A private swarm on loopback: a bootstrap DHT here, server nodes as child processes."""

    def __init__(self, log_dir: Path, device: str = "cpu", torch_dtype: str = "float32", threads: int = 0):
        self.log_dir = Path(log_dir)
        self.device = device
        self.torch_dtype = torch_dtype
        self.threads = threads
        self.nodes: List[SwarmNode] = []
        self.dht: Optional[DHT] = None

    @property
    def initial_peers(self) -> List[str]:
        """Multiaddrs that clients and nodes join the swarm through."""
        if self.dht is None:
            raise RuntimeError("the local swarm is not started")
        return [str(maddr) for maddr in self.dht.get_visible_maddrs()]

    def start(self) -> "LocalSwarm":
        """Starts the bootstrap DHT node."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.dht = DHT(host_maddrs=[LOOPBACK_MADDR], start=True)
        logger.info("Local swarm bootstrap peer: %s", " ".join(self.initial_peers))
        return self

    def add_node(self, model: SwarmModel, block_indices: Optional[str] = None,
                 extra_options: Sequence[str] = ()) -> SwarmNode:
        """Starts a server process for ``model`` (all its blocks, or ``block_indices`` like "0:4").

        ``extra_options`` go to petals' server as they are (e.g. ``--update-period 2``).
        """
        index = len(self.nodes)
        log_path = self.log_dir / f"node-{index}-{model.dht_prefix}.log"
        command = [
            sys.executable, "-m", "swarm", "serve", model.path,
            "--threads", str(self.threads),
            "--dht-prefix", model.dht_prefix,
            "--initial-peers", *self.initial_peers,
            "--host-maddrs", LOOPBACK_MADDR,
            "--device", self.device,
            "--torch-dtype", self.torch_dtype,
            "--throughput", str(NODE_THROUGHPUT),
            "--skip-reachability-check",
            "--no-auto-relay",
        ]
        # All blocks are named too: a node told only how many blocks to serve first spends seconds
        # asking the swarm which ones, before it announces any.
        command += ["--block-indices", block_indices if block_indices is not None else f"0:{model.num_blocks}"]
        command += list(extra_options)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )
        node = SwarmNode(model=model, process=process, log_path=log_path, block_indices=block_indices)
        self.nodes.append(node)
        logger.info("Started swarm node %d (pid %d) for %s, log: %s", index, process.pid, model.dht_prefix, log_path)
        return node

    def announced_blocks(self, model: SwarmModel) -> int:
        """How many of the model's blocks at least one online server announces."""
        uids = [f"{model.dht_prefix}.{index}" for index in range(model.num_blocks)]
        return sum(block.online for block in lookup_blocks(self.dht, uids))

    def wait_until_ready(
        self,
        models: Sequence[SwarmModel],
        timeout: float = 600.0,
        on_progress: Optional[Callable[[SwarmModel, int], None]] = None,
    ) -> None:
        """Blocks until every block of every model is online; raises SwarmStartError otherwise."""
        deadline = time.monotonic() + timeout
        last_counts: Dict[str, int] = {}
        while True:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise SwarmStartError(
                        f"swarm node for {node.model.dht_prefix} exited with code {node.process.returncode}; "
                        f"last lines of {node.log_path}:\n{node.log_tail()}"
                    )
            counts = {model.dht_prefix: self.announced_blocks(model) for model in models}
            for model in models:
                if counts[model.dht_prefix] != last_counts.get(model.dht_prefix) and on_progress is not None:
                    on_progress(model, counts[model.dht_prefix])
            last_counts = counts
            if all(counts[model.dht_prefix] == model.num_blocks for model in models):
                return
            if time.monotonic() > deadline:
                missing = ", ".join(f"{m.dht_prefix}: {counts[m.dht_prefix]}/{m.num_blocks}" for m in models)
                raise SwarmStartError(f"blocks not announced after {timeout:.0f} s ({missing})")
            time.sleep(0.5)

    def stop_node(self, node: SwarmNode, timeout: float = 15.0, crash: bool = False) -> None:
        """Stops one node: SIGTERM, then SIGKILL to its whole process group after ``timeout``.

        With ``crash`` the node gets SIGKILL at once, as if its machine died: it announces
        nothing, and its DHT records stay until they expire.
        """
        if node.process.poll() is None and not crash:
            node.process.send_signal(signal.SIGTERM)
            try:
                node.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("Swarm node pid %d did not stop in %.0f s, killing it", node.process.pid, timeout)
        # The node's DHT and p2p daemon share its process group: make sure none is left.
        try:
            os.killpg(node.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.process.wait()
        if node in self.nodes:
            self.nodes.remove(node)

    def stop(self) -> None:
        """Stops every node, then the bootstrap DHT."""
        for node in list(self.nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in list(self.nodes):
            self.stop_node(node)
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        logger.info("Local swarm stopped")

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
