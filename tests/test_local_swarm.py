"""The local swarm launcher: start-up failures are reported, shutdown leaves no process."""

import psutil
import pytest

from swarm.local import LocalSwarm, SwarmModel, SwarmStartError


def test_stop_leaves_no_child_process(tmp_path, tiny_model_specs):
    spec = tiny_model_specs[0]
    model = SwarmModel(str(spec.path), "shutdown-check", 4)
    this_process = psutil.Process()
    before = {child.pid for child in this_process.children(recursive=True)}
    with LocalSwarm(tmp_path, threads=1) as swarm:
        swarm.add_node(model)
        swarm.wait_until_ready([model], timeout=120)
        started = [child for child in this_process.children(recursive=True) if child.pid not in before]
        # The bootstrap DHT, its p2p daemon, the node, and the node's own DHT and daemon.
        assert len(started) >= 4
    leftovers = [
        child for child in started
        # torch's shared-memory helper belongs to this test process, not to the swarm.
        if child.is_running() and child.status() != psutil.STATUS_ZOMBIE and child.name() != "torch_shm_manager"
    ]
    assert leftovers == []


def test_a_node_that_dies_is_reported_with_its_log(tmp_path):
    model = SwarmModel(str(tmp_path / "no-such-model"), "broken", 2)
    with LocalSwarm(tmp_path, threads=1) as swarm:
        swarm.add_node(model)
        with pytest.raises(SwarmStartError, match="exited with code"):
            swarm.wait_until_ready([model], timeout=120)
