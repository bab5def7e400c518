"""Which servers the DHT says hold each block of a model: the one lookup every caller shares."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from swarm.petals_api import ServerState, get_remote_module_infos


@dataclass(frozen=True)
class BlockServers:
    """The servers announcing one block: peer id to petals' ``ServerInfo``."""

    index: int
    servers: Dict[Any, Any]

    @property
    def online(self) -> bool:
        """Whether at least one server of this block is online."""
        return any(info.state == ServerState.ONLINE for info in self.servers.values())


def lookup_blocks(dht: Any, block_uids: Sequence[str], adapter: Optional[str] = None) -> List[BlockServers]:
    """The latest announcements of every block in ``block_uids`` (blocking: a DHT query)."""
    infos = get_remote_module_infos(dht, list(block_uids), active_adapter=adapter, latest=True)
    return [BlockServers(index, dict(info.servers) if info is not None else {}) for index, info in enumerate(infos)]
