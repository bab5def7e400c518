"""What the swarm looks like from here: which peers serve which blocks of each model.

The answer comes from a fresh DHT lookup, not from the routing tables the Petals clients
keep (those refresh once a minute), so ``/ready`` and the swarm map notice a lost server as
soon as its announcement is gone.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import swarm.compat  # noqa: F401  (must precede petals)
from petals.data_structures import ServerState
from petals.utils.dht import get_remote_module_infos

from sessions.models import LoadedModel


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


def probe_model(loaded: LoadedModel) -> ModelRoute:
    """Looks up the model's blocks in the DHT (blocking: run it in an executor)."""
    sequence_manager = loaded.sequence_manager
    block_uids = sequence_manager.block_uids
    try:
        block_infos = get_remote_module_infos(sequence_manager.dht, block_uids,
                                              active_adapter=loaded.spec.adapter, latest=True)
    except Exception as error:  # the DHT is unreachable: report it rather than fail the caller
        return ModelRoute(loaded.spec.key, len(block_uids), (), tuple(range(len(block_uids))),
                          f"{type(error).__name__}: {error}")
    blocks_by_peer: Dict[object, List[int]] = {}
    infos_by_peer = {}
    missing = []
    for index, block_info in enumerate(block_infos):
        if not any(info.state == ServerState.ONLINE for info in block_info.servers.values()):
            missing.append(index)
        for peer_id, info in block_info.servers.items():
            blocks_by_peer.setdefault(peer_id, []).append(index)
            infos_by_peer[peer_id] = info
    servers = tuple(sorted(
        (ServerSpan(
            peer_id=str(peer_id),
            start=min(blocks),
            end=max(blocks) + 1,
            state=infos_by_peer[peer_id].state.name.lower(),
            throughput=float(infos_by_peer[peer_id].throughput),
            inference_rps=infos_by_peer[peer_id].inference_rps,
            cache_tokens_left=infos_by_peer[peer_id].cache_tokens_left,
            public_name=infos_by_peer[peer_id].public_name,
            version=infos_by_peer[peer_id].version,
        ) for peer_id, blocks in blocks_by_peer.items()),
        key=lambda span: (span.start, span.end, span.peer_id),
    ))
    return ModelRoute(loaded.spec.key, len(block_uids), servers, tuple(missing))
