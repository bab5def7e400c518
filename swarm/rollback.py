"""Sessions that go back: a step may start at any earlier position of its inference session.

petals 2.2 runs each step of an inference session right after the one before (the server keeps
the position, ``prefix_length``, to itself). Our nodes also accept a step that starts earlier:
its metadata carries ``START_POSITION_KEY`` and the server's attention caches are read up to
that position and written from it, so whatever came after is forgotten. Speculative decoding
(feed guesses, keep the right ones) and partial prefix reuse need exactly that.

The protocol has two sides:

- **Server** (``serve_rollback``, installed by ``python -m swarm serve``): its own loop over a
  session's steps in place of petals', which honours the key; the node announces
  ``CAPABILITY_KEY`` in its DHT record and answers it in ``rpc_info``. A stock petals server
  ignores metadata it does not know, so a client must never send the key to one.
- **Client** (``RouteRollback``): before a session relies on going back, every server of its
  route is checked: by its announcement, and where that says nothing (an older record, another
  implementation), by asking the server (``rpc_info``, remembered per server). ``roll_back``
  moves the session back: spans on capable servers go back in place (their next step carries
  the key); a span on any other server is reopened on a server of the swarm and replays its
  history up to the position, as petals' own failover does. Either way the history each span
  keeps for failover is cut to the position, so a later failover replays what stands.
"""

import asyncio
import logging
import threading
from typing import Any, Dict, Optional

import torch
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils.nested import nested_flatten
from hivemind.utils.serializer import MSGPackSerializer

logger = logging.getLogger(__name__)

# In a step's metadata: the position the step starts at (a capable server only).
START_POSITION_KEY = "swarm_chat.start_position"
# In a node's DHT record and its rpc_info: it accepts START_POSITION_KEY.
CAPABILITY_KEY = "swarm_chat.rollback"
# The servers asked (peer id -> whether they can): a swarm has few, each asked once.
MAX_PROBED_SERVERS = 4096
# The longest wait for a server's answer (a server that does not answer counts as unable, and is
# asked again next time).
PROBE_TIMEOUT = 5.0


# --- Server side ---------------------------------------------------------------------------------


def serve_rollback(added_step_delay: float = 0.0) -> None:
    """Makes this process's petals server accept steps that start earlier, and say so.

    ``added_step_delay`` (seconds) is slept before each step's reply: a simulated network trip,
    for benchmarks only.
    """
    import petals.server.handler as handler
    from petals.data_structures import ServerInfo

    handler.iterate_rpc_inference = _steps_at_positions(added_step_delay)

    plain_to_tuple = ServerInfo.to_tuple

    def to_tuple(self):
        state, throughput, extra_info = plain_to_tuple(self)
        return state, throughput, {**extra_info, CAPABILITY_KEY: True}

    ServerInfo.to_tuple = to_tuple

    plain_rpc_info = handler.TransformerConnectionHandler.rpc_info

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        info = MSGPackSerializer.loads((await plain_rpc_info(self, request, context)).serialized_info)
        info[CAPABILITY_KEY] = True
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(info))

    handler.TransformerConnectionHandler.rpc_info = rpc_info  # annotated: hivemind registers it by its types


def serve_added_delay_only(added_step_delay: float) -> None:
    """Adds ``added_step_delay`` seconds to each step of petals' own loop (a node that does not
    roll back, in benchmarks)."""
    import petals.server.handler as handler

    plain_loop = handler.iterate_rpc_inference

    async def delayed(*args, **kwargs):
        async for reply in plain_loop(*args, **kwargs):
            await asyncio.sleep(added_step_delay)
            yield reply

    handler.iterate_rpc_inference = delayed


def _steps_at_positions(added_step_delay: float):
    """petals' ``iterate_rpc_inference`` with a position each step may set (our loop)."""
    from petals.data_structures import InferenceMetadata
    from petals.server.block_functions import MAX_NF4_SHORT_INFERENCE_TOKENS, MAX_SHORT_INFERENCE_TOKENS
    from petals.utils.convert_block import QuantType
    from petals.utils.misc import is_dummy
    from petals.utils.packaging import unpack_args_kwargs

    async def run_steps(requested_uids, requested_backends, active_adapter, input_iterator, cache_handles, *,
                        max_length, prioritizer, points, quant_type, args_structure=None):
        position = 0  # tokens whose attention caches stand
        points_per_token = points / max_length if max_length > 0 else 0.0
        short_step_tokens = (MAX_NF4_SHORT_INFERENCE_TOKENS if quant_type == QuantType.NF4
                             else MAX_SHORT_INFERENCE_TOKENS)
        async for request, metadata in input_iterator:
            tensors = tuple(deserialize_torch_tensor(tensor) for tensor in request.tensors)
            if args_structure is not None:
                tensors, _ = unpack_args_kwargs(tensors, args_structure)
            hidden_states, prompts, hypo_ids, *_ = tensors
            start = metadata.get(START_POSITION_KEY, position)
            if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= position:
                raise ValueError(f"A step cannot start at position {start!r}: the session holds {position} tokens")
            position = start
            batch_size, new_tokens, _ = hidden_states.shape
            if position + new_tokens > max_length:
                raise ValueError(f"Maximum length exceeded: prefix {position} + current {new_tokens} "
                                 f"exceeds pre-allocated maximum {max_length}")
            hidden_states = hidden_states.to(requested_backends[0].dtype)
            if hypo_ids.dtype != torch.int64:
                raise ValueError(f"hypo ids must be int64, got {hypo_ids.dtype}")
            with_prompts = prompts is not None and not is_dummy(prompts)
            if with_prompts:
                prompts = [None if is_dummy(prompt) else prompt
                           for prompt in (p.squeeze(0) for p in prompts.to(hidden_states.dtype).split(1, dim=0))]
            else:
                prompts = [None] * len(requested_backends)
            if len(prompts) != len(requested_backends):
                raise ValueError(f"Received {len(prompts)} prompts for {len(requested_backends)} backends")
            priority = prioritizer.prioritize(hidden_states, hypo_ids, points=points_per_token,
                                              requested_uids=requested_uids, type="inference")
            if hidden_states.numel() > 0:  # an empty step only checks that the cache can be allocated
                if batch_size * new_tokens <= short_step_tokens:  # every block in one task
                    infos = tuple(InferenceMetadata(uid, position, tuple(handles), active_adapter)
                                  for uid, handles in zip(requested_uids, cache_handles))
                    (hidden_states,) = await requested_backends[0].inference_pool.submit_task(
                        hidden_states, hypo_ids, infos, *prompts, priority=priority)
                else:
                    for backend, uid, handles, prompt in zip(requested_backends, requested_uids, cache_handles,
                                                             prompts):
                        infos = (InferenceMetadata(uid, position, tuple(handles), active_adapter),)
                        (hidden_states,) = await backend.inference_pool.submit_task(
                            hidden_states, hypo_ids, infos, prompt, priority=priority)
            outputs = [serialize_torch_tensor(result.to(schema.dtype), schema.compression, allow_inplace=True)
                       for result, schema in zip((hidden_states,),
                                                 nested_flatten(requested_backends[-1].outputs_schema))]
            if added_step_delay:
                await asyncio.sleep(added_step_delay)
            yield outputs, not with_prompts
            position += new_tokens

    return run_steps


# --- Client side ---------------------------------------------------------------------------------


def send_start_positions() -> None:
    """Makes a petals server session send the position its next step starts at, once a rollback
    set one (``start_position``); steps without a rollback are sent exactly as before."""
    from petals.client.inference_session import _ServerInferenceSession

    plain_step = _ServerInferenceSession._step

    async def _step(self, request):
        start = getattr(self, "start_position", None)
        if start is not None:
            metadata = MSGPackSerializer.loads(request.metadata) if request.metadata else {}
            metadata[START_POSITION_KEY] = start
            request.metadata = MSGPackSerializer.dumps(metadata)
            self.start_position = None
        return await plain_step(self, request)

    _ServerInferenceSession._step = _step


def keep_announced_capability() -> None:
    """Keeps ``CAPABILITY_KEY`` of a server's DHT record on its parsed ``ServerInfo`` (pydantic
    drops fields it does not declare): True when announced, None when the record says nothing."""
    from petals.data_structures import ServerInfo

    plain_from_tuple = ServerInfo.from_tuple.__func__

    def from_tuple(cls, source):
        info = plain_from_tuple(cls, source)
        extra_info = source[2] if len(source) > 2 and isinstance(source[2], dict) else {}
        info.rolls_back = True if extra_info.get(CAPABILITY_KEY) is True else None
        return info

    ServerInfo.from_tuple = classmethod(from_tuple)


class RouteRollback:
    """Whether the servers of petals inference sessions can roll back, and the rollback itself.

    One per client process: it remembers what each server answered when asked.
    """

    def __init__(self):
        self._asked: Dict[Any, bool] = {}
        self._lock = threading.Lock()

    def route_rolls_back(self, session: Any) -> bool:
        """Whether every server on ``session``'s route (a petals ``InferenceSession``) rolls back
        in place. Blocking (it may ask a server): call it from a worker thread."""
        return all(self._server_rolls_back(session, span_session)
                   for span_session in list(session._server_sessions))

    def roll_back(self, session: Any, position: int) -> None:
        """Moves ``session`` back to ``position``: its next step starts there. Blocking (a span
        on a server that cannot roll back is reopened)."""
        if not 0 <= position <= session.position:
            raise ValueError(f"cannot roll back to {position}: the session holds {session.position} tokens")
        if position == session.position:
            return
        for index in reversed(range(len(session._server_sessions))):
            span_session = session._server_sessions[index]
            if span_session.history is not None:
                span_session.history = span_session.history[:, :position]
            if not span_session.stepped:
                continue  # its first step replays the history from 0
            if self._server_rolls_back(session, span_session):
                span_session._position = position
                span_session.start_position = position
            else:
                logger.info("Server %s cannot roll back: its span is reopened to replay %d tokens",
                            span_session.span.peer_id, position)
                session._update_sequence(index, span_session.span.start, 1)  # petals' replacement of a span
                reopened = session._server_sessions[index]
                reopened.replay_prefix, reopened.history = reopened.history, None  # see swarm.compat
        session._position = position

    def _server_rolls_back(self, session: Any, span_session: Any) -> bool:
        peer_id = span_session.span.peer_id
        manager = session._sequence_manager
        info = manager.state.sequence_info.block_infos[span_session.span.start].servers.get(peer_id)
        if getattr(info, "rolls_back", None) is True:
            return True
        with self._lock:
            known = self._asked.get(peer_id)
        if known is None:
            known = self._ask(manager, peer_id, manager.block_uids[span_session.span.start])
            if known is None:
                return False
            with self._lock:
                if len(self._asked) >= MAX_PROBED_SERVERS:
                    self._asked.clear()
                self._asked[peer_id] = known
        return known

    @staticmethod
    def _ask(manager: Any, peer_id: Any, block_uid: str) -> Optional[bool]:
        """Asks the server itself (its ``rpc_info``); None when it does not answer."""
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from petals.server.handler import TransformerConnectionHandler

        async def ask() -> Optional[dict]:
            stub = TransformerConnectionHandler.get_stub(manager.state.p2p, peer_id)
            reply = await stub.rpc_info(runtime_pb2.ExpertUID(uid=block_uid),
                                        timeout=min(PROBE_TIMEOUT, manager.config.request_timeout))
            return MSGPackSerializer.loads(reply.serialized_info)

        try:
            info = RemoteExpertWorker.run_coroutine(ask())
        except Exception as error:
            logger.info("Could not ask server %s whether it rolls back (%s): treated as unable for now", peer_id, error)
            return None
        able = isinstance(info, dict) and info.get(CAPABILITY_KEY) is True
        logger.info("Server %s %s roll back", peer_id, "can" if able else "cannot")
        return able


route_rollback = RouteRollback()
