"""What the swarm looks like from here: which peers serve which blocks of each model.

The answer comes from a fresh DHT lookup, not from the routing tables the Petals clients
keep (those refresh once a minute), so ``/ready`` and the swarm map notice a lost server as
soon as its announcement is gone. ``SwarmMonitor`` runs the lookups on a thread of its own
and shares one result among the callers of a few seconds.
"""

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from sessions.models import LoadedModel
from sessions.serving.registry import ModelRegistry
from swarm.blocks import lookup_blocks

# A swarm lookup is reused for this long, so frequent /ready probes cost one DHT query.
SWARM_STATE_MAX_AGE = 2.0


@dataclass(frozen=True)
class ServerSpan:
    """One peer serving a run of a model's blocks."""

    peer_id: str
    start: int  # first block served
    end: int  # one past the last block served
    state: str  # "online", "joining" or "offline"
    throughput: float  # requests per second the peer announces
    inference_rps: Optional[float]
    cache_tokens_left: Optional[int]
    public_name: Optional[str]
    version: Optional[str]


@dataclass(frozen=True)
class ModelRoute:
    """The servers of one model and the blocks that no online server holds."""

    model: str
    num_blocks: int
    servers: Tuple[ServerSpan, ...]
    missing_blocks: Tuple[int, ...]
    error: Optional[str] = None  # the DHT lookup failed

    @property
    def online_servers(self) -> int:
        """How many servers of the model are online."""
        return sum(server.state == "online" for server in self.servers)

    @property
    def full_route(self) -> bool:
        """Whether every block has an online server, so a generation can run."""
        return self.error is None and not self.missing_blocks

    def describe(self, with_servers: bool = True) -> Dict[str, Any]:
        """The route as the APIs show it (``/ready`` leaves the server list out)."""
        described: Dict[str, Any] = {
            "model": self.model,
            "ready": self.full_route,
            "full_route": self.full_route,
            "num_blocks": self.num_blocks,
            "missing_blocks": list(self.missing_blocks),
            "online_servers": self.online_servers,
            "error": self.error,
        }
        if with_servers:
            described["servers"] = [dataclasses.asdict(server) for server in self.servers]
        return described


def probe_model(loaded: LoadedModel) -> ModelRoute:
    """Looks up the model's blocks in the DHT (blocking: run it in an executor)."""
    sequence_manager = loaded.sequence_manager
    block_uids = sequence_manager.block_uids
    try:
        blocks = lookup_blocks(sequence_manager.dht, block_uids, loaded.spec.adapter)
    except Exception as error:  # the DHT is unreachable: report it rather than fail the caller
        return ModelRoute(loaded.spec.key, len(block_uids), (), tuple(range(len(block_uids))),
                          f"{type(error).__name__}: {error}")
    blocks_by_peer: Dict[object, List[int]] = {}
    infos_by_peer = {}
    for block in blocks:
        for peer_id, info in block.servers.items():
            blocks_by_peer.setdefault(peer_id, []).append(block.index)
            infos_by_peer[peer_id] = info
    servers = tuple(sorted(
        (ServerSpan(
            peer_id=str(peer_id),
            start=min(indices),
            end=max(indices) + 1,
            state=infos_by_peer[peer_id].state.name.lower(),
            throughput=float(infos_by_peer[peer_id].throughput),
            inference_rps=infos_by_peer[peer_id].inference_rps,
            cache_tokens_left=infos_by_peer[peer_id].cache_tokens_left,
            public_name=infos_by_peer[peer_id].public_name,
            version=infos_by_peer[peer_id].version,
        ) for peer_id, indices in blocks_by_peer.items()),
        key=lambda span: (span.start, span.end, span.peer_id),
    ))
    missing = tuple(block.index for block in blocks if not block.online)
    return ModelRoute(loaded.spec.key, len(block_uids), servers, missing)


class SwarmMonitor:
    """Every model's route, from a DHT lookup at most ``SWARM_STATE_MAX_AGE`` seconds old.

    Lookups run on a one-thread pool of their own, so a busy generation executor never
    delays ``/ready``.
    """

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-probe")
        self._lookup: Optional["asyncio.Future[List[ModelRoute]]"] = None
        self._lookup_time = 0.0

    async def routes(self) -> List[ModelRoute]:
        """Every model's route (raises ``NotReady`` before the models are connected)."""
        models = self.registry.models
        fresh = time.monotonic() - self._lookup_time < SWARM_STATE_MAX_AGE
        if self._lookup is None or (self._lookup.done() and not fresh):
            # Concurrent callers share one lookup; the next caller after it ages starts another.
            self._lookup = asyncio.get_running_loop().run_in_executor(self._pool, _probe_all, models)
            self._lookup_time = time.monotonic()
        return await asyncio.shield(self._lookup)

    def close(self) -> None:
        """Stops the lookup thread (a lookup in flight finishes on its own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _probe_all(models: List[LoadedModel]) -> List[ModelRoute]:
    return [probe_model(loaded) for loaded in models]
