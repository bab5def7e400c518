"""The petals (and hivemind) names this project uses, imported once the compatibility patch is in.

Import petals through this module only: ``swarm.compat`` must run before petals is first
imported, and here it always does; then our model families are registered (``swarm.families``). Server steps are traced from here
on (``swarm.route_trace``), and sessions can go back on the servers that allow it (``swarm.rollback``).
"""

import swarm.compat  # noqa: F401  (must precede petals)
from hivemind import DHT
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from petals import AutoDistributedModelForCausalLM
from petals.client.inference_session import InferenceSession, _ServerInferenceSession
from petals.constants import PUBLIC_INITIAL_PEERS
from petals.data_structures import ServerState
from petals.utils.auto_config import _CLASS_MAPPING
from petals.utils.dht import get_remote_module_infos

from swarm.families.registry import register_families
from swarm.rollback import keep_announced_capability, route_rollback, send_start_positions
from swarm.route_trace import recording, trace_server_steps

trace_server_steps(_ServerInferenceSession)
register_families()
send_start_positions()
keep_announced_capability()


def supported_model_types() -> frozenset:
    """The model types petals has classes for (its registry of families)."""
    return frozenset(_CLASS_MAPPING)

__all__ = ["DHT", "RemoteExpertWorker", "AutoDistributedModelForCausalLM", "InferenceSession",
           "PUBLIC_INITIAL_PEERS", "ServerState", "get_remote_module_infos", "recording", "route_rollback",
           "supported_model_types"]
