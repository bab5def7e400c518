"""The README's shell examples, run as written: every ``curl`` command against the test app, and
the private-swarm example (two nodes that split the default model, then the chat server joined
to them).

Only what cannot run here is changed: the server's address becomes the test app's, the nodes
listen on 127.0.0.1 instead of every interface, the placeholder address becomes the first
node's real one, and a fixed throughput replaces petals' internet speed test.
"""

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import List

import pytest
import tornado.testing

from tests.conftest import REPO_ROOT
from tests.helpers import wait_for_no_sessions
from tests.test_server_process import read_until_ready

SECTION = "## Growing a private swarm across machines"
PLACEHOLDER_PEER = re.compile(r"/ip4/10\.0\.0\.5/tcp/31337/p2p/12D3KooW\.\.\.")
RUNNING_LINE = re.compile(r"Running a server on \[([^\]]*)\]")
NODE_READY_TIMEOUT = 240
OFFLINE_NODE_OPTIONS = ["--throughput", "1000", "--no-auto-relay"]


README_SERVER = "http://127.0.0.1:5000/"
README_API_KEY = "readme-key"


def readme_commands(section: str = "") -> List[List[str]]:
    """The shell commands of the README (or of one section), continuation lines joined, comments
    dropped, environment variables left as they are."""
    readme = (REPO_ROOT / "README.md").read_text()
    if section:
        readme = readme[readme.index(section):]
        readme = readme[:readme.index("\n## ", 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        text = block.replace("\\\n", " ")
        commands += [shlex.split(line, comments=True, posix=True) for line in text.splitlines()
                     if line.strip() and not line.startswith("{")]  # "{...}" lines show a reply
    return [command for command in commands if command]


def curl_commands() -> List[List[str]]:
    return [words for words in readme_commands() if words[0] == "curl"]


@pytest.fixture
def keyed_port(serve_with):
    """A port serving the app with the README's API key set."""
    return serve_with(api_key=README_API_KEY)


@pytest.mark.parametrize("words", curl_commands(), ids=lambda words: " ".join(words[1:3])[:60])
async def test_curl_example_runs_as_written(words, ws_port, keyed_port, manager):
    keyed = any("$SWARM_CHAT_API_KEY" in word for word in words)
    server = f"http://127.0.0.1:{keyed_port if keyed else ws_port}/"
    command = [word.replace("$SWARM_CHAT_API_KEY", README_API_KEY).replace(README_SERVER, server) for word in words]
    assert any(server in word for word in command), "the example names the README's server address"
    curl = await asyncio.create_subprocess_exec(
        *command, "-sS", "--fail-with-body", stdout=asyncio.subprocess.PIPE)
    stdout, _ = await asyncio.wait_for(curl.communicate(), 120)
    assert curl.returncode == 0, stdout
    reply = json.loads(stdout)
    if "choices" in reply:
        assert reply["choices"][0]["message"]["content"]
    else:
        assert reply["ok"] is True
    if "outputs" in reply:
        assert reply["outputs"] and not reply["outputs"].startswith("Once upon a time")  # only the new text
    await wait_for_no_sessions(manager)


def node_command(words: List[str], port: int, peer: str) -> List[str]:
    """A README node command as it can run here."""
    assert words[:4] == [".venv/bin/python", "-m", "swarm", "serve"], words
    command = [sys.executable, *words[1:]]
    if "--port" in command:
        at = command.index("--port")
        command[at:at + 2] = ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"]
    else:
        command += ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    return [PLACEHOLDER_PEER.sub(peer, word) for word in command] + OFFLINE_NODE_OPTIONS


def start(command: List[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as log_file:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for_log(process: subprocess.Popen, log: Path, pattern: re.Pattern, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text(errors="replace"))
        if match:
            return match
        assert process.poll() is None, f"{process.args[:6]} exited:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"{pattern.pattern!r} not logged in {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def test_private_swarm_example_runs_as_written(tmp_path, default_model_dir, local_swarm):
    first_words, second_words, server_words = readme_commands(SECTION)
    assert server_words[:2] == ["make", "run"] and server_words[2].startswith("ARGS=")
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    processes = []
    try:
        first = start(node_command(first_words, port, ""), tmp_path / "first.log")
        processes.append(first)
        maddrs = wait_for_log(first, tmp_path / "first.log", RUNNING_LINE, NODE_READY_TIMEOUT).group(1)
        peer = next(maddr.strip(" '\"") for maddr in maddrs.split(",") if "/ip4/127.0.0.1/" in maddr)
        second = start(node_command(second_words, port, peer), tmp_path / "second.log")
        processes.append(second)
        wait_for_log(second, tmp_path / "second.log", RUNNING_LINE, NODE_READY_TIMEOUT)
        # make run ARGS="..." runs server.py with those arguments.
        arguments = [PLACEHOLDER_PEER.sub(peer, word) for word in shlex.split(server_words[2][len("ARGS="):])]
        server = subprocess.Popen([sys.executable, "server.py", *arguments, "--host", "127.0.0.1", "--port", "0"],
                                  cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                  start_new_session=True)
        processes.append(server)
        url, _ = read_until_ready(server)
        with urllib.request.urlopen(url + "ready", timeout=30) as response:
            ready = json.load(response)
        assert ready["ready"] is True and ready["models"][0]["online_servers"] == 2, ready
        request = urllib.request.Request(url + "api/v1/generate", data=b"model=smollm2&inputs=Hello&max_new_tokens=3")
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.load(response)["ok"] is True
    finally:
        for process in reversed(processes):
            stop(process)


@pytest.mark.parametrize("words", readme_commands(SECTION)[:2])
def test_node_examples_name_their_blocks_once(words):
    """petals refuses --num-blocks together with --block-indices."""
    assert not ("--num-blocks" in words and "--block-indices" in words)
