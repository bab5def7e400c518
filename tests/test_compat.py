"""The compatibility layer: every name petals imports from hivemind resolves."""

import ast
import importlib
from pathlib import Path

import swarm.compat  # noqa: F401  (must precede petals)
import hivemind
import petals


def hivemind_names_used_by_petals():
    """(module, name) for each ``from hivemind... import name`` and ``hivemind.name`` in petals' source."""
    used = set()
    for source in Path(petals.__file__).parent.rglob("*.py"):
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hivemind":
                used.update((node.module, alias.name) for alias in node.names if alias.name != "*")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hivemind":
                used.add(("hivemind", node.attr))
    return used


def test_petals_source_imports_from_hivemind():
    used = hivemind_names_used_by_petals()
    # The list is derived, not written down: make sure the derivation found the known cases.
    assert ("hivemind", "PeerID") in used
    assert ("hivemind", "MSGPackSerializer") in used
    assert len(used) > 50


def test_every_name_petals_imports_from_hivemind_resolves():
    missing = []
    for module_name, name in sorted(hivemind_names_used_by_petals()):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"{module_name}.{name}")
    assert missing == []


def test_restored_names_are_hivemind_objects():
    from hivemind.p2p import PeerID
    from hivemind.utils.logging import get_logger

    assert hivemind.PeerID is PeerID
    assert hivemind.get_logger is get_logger


def test_version_check_makes_no_network_call(monkeypatch):
    import petals.utils.version
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("the version check went to the network")

    monkeypatch.setattr(requests, "get", no_network)
    petals.utils.version.validate_version()


def test_worker_loop_can_run_coroutines_from_its_own_thread():
    """A petals session finalized on hivemind's worker thread used to deadlock the client."""
    import asyncio

    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    ran = []

    async def record():
        ran.append(True)

    async def call_from_worker_thread():
        RemoteExpertWorker.run_coroutine(record())  # would block forever on its own loop
        await asyncio.sleep(0.05)
        return "done"

    assert RemoteExpertWorker.run_coroutine(call_from_worker_thread(), return_future=True).result(timeout=5) == "done"
    assert ran == [True]


def test_a_server_session_whose_server_never_answers_closes_in_bounded_time():
    """What a session collected after its server (or our p2p daemon) is gone goes through."""
    import asyncio
    import threading
    import time
    from types import SimpleNamespace

    from petals.client.inference_session import _ServerInferenceSession

    async def never_ends():
        await asyncio.sleep(3600)
        yield None

    def silent_session():
        session = _ServerInferenceSession.__new__(_ServerInferenceSession)
        session.config = SimpleNamespace(request_timeout=0.3)
        session.stepped, session.closed = True, False
        session._inputs_queue, session._outputs_stream = asyncio.Queue(), never_ends()
        return session

    def seconds_to(call) -> float:
        started = time.monotonic()
        worker = threading.Thread(target=call, daemon=True)  # a hang fails the test, not the run
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), "closing waited for a server that never answers"
        return time.monotonic() - started

    assert seconds_to(silent_session().close) < 3
    assert seconds_to(silent_session().__del__) < 0.2  # the finalizer does not wait at all


def test_a_failed_server_leaves_the_routes_at_once():
    """Routes are built from spans; a failure must drop the server's span, not only its entry."""
    import threading
    from types import SimpleNamespace

    from hivemind import PeerID
    from petals.client.routing.sequence_info import RemoteSequenceInfo
    from petals.client.routing.sequence_manager import RemoteSequenceManager
    from petals.data_structures import RemoteModuleInfo, ServerInfo, ServerState

    hung, healthy = PeerID(b"hung-server-id"), PeerID(b"healthy-server-id")

    def servers():
        return {peer: ServerInfo(ServerState.ONLINE, throughput=1.0, start_block=0, end_block=2)
                for peer in (hung, healthy)}

    info = RemoteSequenceInfo.make_empty(["m.0", "m.1"])
    info.update_([RemoteModuleInfo("m.0", servers()), RemoteModuleInfo("m.1", servers())])
    manager = SimpleNamespace(
        state=SimpleNamespace(sequence_info=info, banned_peers=SimpleNamespace(register_failure=lambda peer: None)),
        lock_changes=threading.Lock(), ready=threading.Event(), update=lambda wait: None)
    RemoteSequenceManager.on_request_failure(manager, hung)
    assert [[span.peer_id for span in spans] for spans in info.spans_containing_block] == [[healthy], [healthy]]


def test_a_node_whose_own_announcement_lapsed_keeps_its_blocks(monkeypatch):
    from types import SimpleNamespace

    import petals.server.server as petals_server
    from hivemind.p2p import PeerID
    from petals.data_structures import RemoteModuleInfo, ServerInfo, ServerState

    own, other = PeerID(b"own-node-peer-id"), PeerID(b"other-node-peer-id")
    # The DHT lists another server for both blocks, and nothing of this node's own.
    infos = [RemoteModuleInfo(f"m-hf.{index}", {other: ServerInfo(ServerState.ONLINE, 100.0, start_block=0,
                                                                   end_block=2)}) for index in range(2)]
    monkeypatch.setattr(petals_server, "get_remote_module_infos", lambda *args, **kwargs: infos)
    node = SimpleNamespace(strict_block_indices=None, dht=SimpleNamespace(peer_id=own), module_uids=["m-hf.0", "m-hf.1"],
                           balance_quality=0.75)
    assert petals_server.Server._should_choose_other_blocks(node) is False  # petals asserted here, and the node exited
    infos[0].servers[own] = infos[1].servers[own] = ServerInfo(ServerState.ONLINE, 1.0, start_block=0, end_block=2)
    assert petals_server.Server._should_choose_other_blocks(node) is False  # announced: petals' own answer
