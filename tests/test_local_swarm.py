"""The local swarm launcher: start-up failures are reported. (That stopping it leaves no process
is checked on the server process that runs it, in ``test_server_process.py``.)"""

import pytest

from swarm.local import LocalSwarm, SwarmModel, SwarmStartError


def test_a_node_that_dies_is_reported_with_its_log(tmp_path):
    model = SwarmModel(str(tmp_path / "no-such-model"), "broken", 2)
    with LocalSwarm(tmp_path, threads=1) as swarm:
        swarm.add_node(model)
        with pytest.raises(SwarmStartError, match="exited with code"):
            swarm.wait_until_ready([model], timeout=120)
