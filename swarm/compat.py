"""Makes petals 2.2.0.post1 run on hivemind 1.1.12.

petals 2.2 was written against hivemind 1.1.10, whose top-level package re-exported
most of ``hivemind.p2p``, ``hivemind.utils`` and ``hivemind.compression``; 1.1.12 dropped
those re-exports, so ``from hivemind import PeerID`` (and many like it in petals) fails.
Importing this module puts the names back and silences petals' start-up query of the
package index for a newer release (it needs a network this server may not have).

It also keeps a garbage-collected petals inference session from freezing the client: its
finalizer closes the session through hivemind's worker event loop and waits for the result,
which deadlocks when the collection happens on that loop's own thread.

And it fixes the take-over after a server fails mid-session (petals issue 587): the server
session that replaces the failed one inherits the token history but starts at position 0,
so its first step fails an assertion instead of replaying that history.

Closing a server session waits a bounded time, and its finalizer never waits, so that a
session collected at exit cannot hang the process.

And a server that failed a request (dead, or hung past the request timeout) leaves the routes
at once: petals drops it from its table of servers but keeps routing through it until the next
routing update (a minute later by default), so every retry went back to the same server.

It sizes a server's attention caches by the config's ``head_dim`` (Qwen3's differs from
``hidden_size / heads``), for the model families ``swarm.families`` adds.

A node whose own announcement lapsed from the DHT under load keeps serving its blocks instead of
failing petals' block-selection assertion and exiting.

Import it before the first ``import petals`` in every process that uses petals.
"""

import asyncio
import concurrent.futures
import importlib
import logging
import os
import threading

import hivemind
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.utils.tensor_descr import TensorDescriptor

logger = logging.getLogger(__name__)

# Modules whose public names hivemind 1.1.10 re-exported at the top level.
REEXPORTED_MODULES = (
    "hivemind.p2p",
    "hivemind.utils",
    "hivemind.utils.asyncio",
    "hivemind.utils.logging",
    "hivemind.utils.mpfuture",
    "hivemind.utils.nested",
    "hivemind.utils.networking",
    "hivemind.utils.serializer",
    "hivemind.utils.streaming",
    "hivemind.utils.tensor_descr",
    "hivemind.utils.timed_storage",
    "hivemind.compression",
)


def _public_names(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name in vars(module) if not name.startswith("_")]
    return names


def restore_hivemind_exports() -> int:
    """Puts the names petals imports back on the ``hivemind`` package; returns how many."""
    restored = 0
    for module_name in REEXPORTED_MODULES:
        module = importlib.import_module(module_name)
        for name in _public_names(module):
            value = getattr(module, name)
            # Submodules and names hivemind still exports keep their current meaning.
            if hasattr(hivemind, name) or getattr(value, "__name__", None) == f"{module_name}.{name}":
                continue
            setattr(hivemind, name, value)
            restored += 1
    return restored


def silence_version_check() -> None:
    """Replaces petals' network query for a newer release with a plain log line."""
    import petals.utils.version

    def log_version_only() -> None:
        logger.info("Running petals %s", petals.__version__)

    petals.utils.version.validate_version = log_version_only


def make_worker_reentrant() -> None:
    """Lets code running on hivemind's worker loop thread call ``run_coroutine`` without deadlock.

    From that thread the coroutine is scheduled on the loop instead of awaited; only a
    finalizer does this (its result was never used), everyone else calls from other threads.
    """
    blocking_run = RemoteExpertWorker.run_coroutine.__func__

    def run_coroutine(cls, coroutine, return_future: bool = False):
        if threading.current_thread() is cls._event_thread and cls._pid == os.getpid():
            task = asyncio.ensure_future(coroutine, loop=cls._event_loop_fut.result())
            return task if return_future else None
        return blocking_run(cls, coroutine, return_future)

    RemoteExpertWorker.run_coroutine = classmethod(run_coroutine)


def replay_history_on_takeover() -> None:
    """Makes the server sessions that take over a failed one replay the whole history.

    The first replacement has not stepped yet but holds the failed session's history, which
    already ends with this step's inputs: it sends all of it (rebuilding the attention caches on
    the new server) and returns only the outputs of this step's tokens, as the caller expects.
    When the failed span is taken over by several servers, the first one's outputs for the
    whole history are the next one's history, and so on down the replacements: petals itself
    hands the history to the first replacement only, and the others would run without context.
    A session reopened by a rollback holds, as ``replay_prefix``, the history up to the position
    rolled back to, without this step's inputs: it replays that, then this step.
    """
    from petals.client.inference_session import _ServerInferenceSession

    original_step = _ServerInferenceSession.step

    def step(self, inputs, prompts, hypo_ids, *, step_id):
        new_tokens = inputs.shape[1]
        inherited = self.history
        kept = getattr(self, "replay_prefix", None)
        if kept is not None:  # reopened by a rollback (swarm.rollback): the kept history, then this step
            self.replay_prefix = None
            inherited = torch.cat([kept, inputs[:, -new_tokens:]], dim=1)
        elif self.stepped or inherited is None or inherited.shape[1] == self._position + new_tokens:
            return original_step(self, inputs, prompts, hypo_ids, step_id=step_id)
        self.history = None
        outputs = original_step(self, inherited, prompts, hypo_ids, step_id=step_id)
        following = self.next_session
        if following is not None and not following.stepped and following.history is None:
            following.history = outputs  # a fellow replacement: it replays from these
        return outputs[:, -new_tokens:]

    _ServerInferenceSession.step = step


def bound_server_session_close() -> None:
    """Keeps closing a petals server session from waiting forever.

    petals' ``close`` waits, without a timeout, for the server to answer the end of the session,
    and its finalizer calls ``close``: a session collected after its server (or our own p2p
    daemon) is gone blocks whichever thread the garbage collector runs on, the main thread at
    exit included. Here ``close`` waits at most the client's request timeout, and the finalizer
    never waits.
    """
    from petals.client.inference_session import _ServerInferenceSession

    def close(self) -> None:
        if self._outputs_stream is None:
            return  # already closed
        try:
            ending = RemoteExpertWorker.run_coroutine(self._aclose_stream(), return_future=True)
            if isinstance(ending, concurrent.futures.Future):  # not on hivemind's own loop thread
                ending.result(timeout=self.config.request_timeout)
        except concurrent.futures.TimeoutError:
            ending.cancel()
            logger.warning("A swarm server did not confirm the end of a session within %.0f s",
                           self.config.request_timeout)
        finally:
            self._outputs_stream = self._inputs_queue = None
            self.closed = True

    def finalize(self) -> None:
        if self._outputs_stream is None:
            return
        try:
            RemoteExpertWorker.run_coroutine(self._aclose_stream(), return_future=True)  # not awaited
        except Exception:  # at interpreter exit hivemind's loop may be gone: nothing left to tell
            pass
        self._outputs_stream = self._inputs_queue = None
        self.closed = True

    _ServerInferenceSession.close = close
    _ServerInferenceSession.__del__ = finalize


def reroute_around_failed_servers() -> None:
    """Rebuilds the routes from the servers left as soon as one fails.

    petals' ``on_request_failure`` bans the server and removes it from each block's servers,
    but the spans that routes are built from are computed only by a routing update (which it
    starts at once only when a block has no server left).
    """
    from petals.client.routing.sequence_info import RemoteSequenceInfo
    from petals.client.routing.sequence_manager import RemoteSequenceManager

    original_on_request_failure = RemoteSequenceManager.on_request_failure

    def on_request_failure(self, peer_id) -> None:
        original_on_request_failure(self, peer_id)
        with self.lock_changes:
            info = self.state.sequence_info
            # A block left without servers makes petals run a full routing update instead.
            if all(block.servers for block in info.block_infos):
                info.spans_by_priority, info.spans_containing_block = RemoteSequenceInfo._sort_spans(info.block_infos)

    RemoteSequenceManager.on_request_failure = on_request_failure


def key_value_width_ratio(config) -> float:
    """How much wider a config's keys and values are than petals assumes (``hidden_size / heads``
    per head): ``head_dim * heads / hidden_size``, 1 for a config without a ``head_dim`` of its own."""
    head_dim = getattr(config, "head_dim", None)
    return head_dim * config.num_attention_heads / config.hidden_size if head_dim else 1.0


def size_caches_by_head_dim() -> None:
    """Makes a server's attention caches, its cache budget and the free cache it announces follow
    the config's ``head_dim``: petals assumes every head is ``hidden_size / heads`` wide, which a
    config may contradict (Qwen3 0.6B's heads are twice that)."""
    from petals.server.backend import TransformerBackend
    from petals.server.server import ModuleAnnouncerThread, Server

    def get_inference_cache_descriptors(self, batch_size: int, max_length: int):
        head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        cache_tensors = []
        for device, num_heads in zip(self.module.devices, self.shard_num_heads):
            num_heads //= self.config.num_key_value_groups
            cache_tensors.append(TensorDescriptor((batch_size, num_heads, head_dim, max_length), dtype=self.dtype,
                                                  device=device))
            cache_tensors.append(TensorDescriptor((batch_size, num_heads, max_length, head_dim), dtype=self.dtype,
                                                  device=device))
        return cache_tensors

    original_server_init = Server.__init__
    original_announcer_init = ModuleAnnouncerThread.__init__

    def server_init(self, *args, **kwargs) -> None:
        original_server_init(self, *args, **kwargs)
        ratio = key_value_width_ratio(self.block_config)
        if ratio != 1.0:
            self._cache_bytes_per_block = int(self._cache_bytes_per_block * ratio)
            self.attn_cache_bytes = self._cache_bytes_per_block * self.num_blocks
            logger.info("Attention cache resized for head_dim %d: up to %.2f GiB", self.block_config.head_dim,
                        self.attn_cache_bytes / 1024**3)

    def announcer_init(self, *args, block_config, **kwargs) -> None:
        original_announcer_init(self, *args, block_config=block_config, **kwargs)
        self.bytes_per_token = int(self.bytes_per_token * key_value_width_ratio(block_config))

    TransformerBackend.get_inference_cache_descriptors = get_inference_cache_descriptors
    Server.__init__ = server_init
    ModuleAnnouncerThread.__init__ = announcer_init


def keep_blocks_when_own_announcement_lapsed() -> None:
    """Keeps a node serving its blocks when the DHT has lost its own announcement.

    A node that chose its blocks itself checks now and then whether the swarm would be better
    served by other blocks, and petals asserts that its own span is announced: on a machine so
    loaded that the announcement lapsed before it was renewed, every such node exited at once.
    It keeps its blocks instead, and its next announcement puts the span back.
    """
    from petals.server.server import Server

    original_check = Server._should_choose_other_blocks

    def _should_choose_other_blocks(self) -> bool:
        try:
            return original_check(self)
        except AssertionError as error:  # only block selection's check of the node's own span
            logger.warning("Keeping the blocks this node serves: %s (its next announcement restores it)", error)
            return False

    Server._should_choose_other_blocks = _should_choose_other_blocks


os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
restore_hivemind_exports()
silence_version_check()
make_worker_reentrant()
replay_history_on_takeover()
bound_server_session_close()
reroute_around_failed_servers()
size_caches_by_head_dim()
keep_blocks_when_own_announcement_lapsed()
