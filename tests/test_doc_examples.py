"""The documentation's examples, run as written: the shell commands of README.md and of every
docs/*.md, and the README's Python WebSocket example.

Each shell command is run by the test that knows its kind (``RUNNERS``), and a command of no
known kind fails ``test_every_shell_example_is_run``, so no example goes stale unnoticed:

- every ``curl`` command runs against the test app;
- the private-swarm recipe runs in full: two nodes that split the default model, then the chat
  server joined to them, after its setup commands;
- every ``make run ARGS="..."`` has its arguments parsed by the server's own parser, and every
  other ``make`` command runs as a dry run (``make -n``): nothing is installed;
- ``python -m pytest`` commands collect what they select, and the other ``.venv/bin/python``
  commands run as written.

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
from typing import List, Tuple

import pytest

from config import build_parser
from tests.conftest import REPO_ROOT

DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PRIVATE_SWARM_DOC = REPO_ROOT / "docs" / "operations.md"
SECTION = "## A private swarm across machines"
PLACEHOLDER_PEER = re.compile(r"/ip4/10\.0\.0\.5/tcp/31337/p2p/12D3KooW\.\.\.")
RUNNING_LINE = re.compile(r"Running a server on \[([^\]]*)\]")
NODE_READY_TIMEOUT = 240
OFFLINE_NODE_OPTIONS = ["--throughput", "1000", "--no-auto-relay"]
VENV_PYTHON = ".venv/bin/python"
SHELL_BLOCK = re.compile(r"^( *)```(?:bash|sh|shell|console)\n(.*?)^\1```", re.S | re.M)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

DOC_SERVER = "http://127.0.0.1:5000/"
DOC_WEBSOCKET = "ws://127.0.0.1:5000/"
DOC_API_KEY = "readme-key"


def shell_commands(text: str) -> List[List[str]]:
    """The shell commands of a Markdown text, continuation lines joined, comments dropped,
    environment variables left as they are."""
    commands = []
    for indent, block in SHELL_BLOCK.findall(text):
        lines = [line[len(indent):] if line.startswith(indent) else line for line in block.splitlines()]
        text = "\n".join(lines).replace("\\\n", " ")
        commands += [shlex.split(line, comments=True, posix=True) for line in text.splitlines()
                     if line.strip() and not line.startswith("{")]  # "{...}" lines show a reply
    return [command for command in commands if command]


def doc_commands() -> List[Tuple[str, List[str]]]:
    """(file, command) for every shell command of the documentation."""
    return [(path.relative_to(REPO_ROOT).as_posix(), words)
            for path in DOC_FILES for words in shell_commands(path.read_text())]


def section_commands(path: Path, section: str) -> List[List[str]]:
    text = path.read_text()
    text = text[text.index(section):]
    end = text.find("\n## ", 1)
    return shell_commands(text if end < 0 else text[:end])


def private_swarm_commands() -> List[List[str]]:
    return section_commands(PRIVATE_SWARM_DOC, SECTION)


def example_id(example) -> str:
    path, words = example
    return f"{Path(path).name}: {' '.join(words)[:70]}"


def is_curl(words: List[str]) -> bool:
    return words[0] == "curl"


def is_make_run(words: List[str]) -> bool:
    return words[:2] == ["make", "run"]


def is_other_make(words: List[str]) -> bool:
    return words[0] == "make" and not is_make_run(words)


def is_node(words: List[str]) -> bool:
    return words[:4] == [VENV_PYTHON, "-m", "swarm", "serve"]


def is_pytest(words: List[str]) -> bool:
    return words[:3] == [VENV_PYTHON, "-m", "pytest"]


def is_keys_command(words: List[str]) -> bool:
    return words[:3] == [VENV_PYTHON, "server.py", "keys"]


def is_python_command(words: List[str]) -> bool:
    return words[0] == VENV_PYTHON and not is_node(words) and not is_pytest(words) and not is_keys_command(words)


def in_private_swarm_recipe(words: List[str]) -> bool:
    return words in private_swarm_commands()


# Each kind of command and the test that runs it.
RUNNERS = {
    "curl": is_curl,
    "make run": is_make_run,
    "make (dry run)": is_other_make,
    "swarm node (private-swarm recipe)": lambda words: is_node(words) and in_private_swarm_recipe(words),
    "pytest (collection)": is_pytest,
    "python": is_python_command,
    "keys command (in order, on a database of its own)": is_keys_command,
}


def test_every_shell_example_is_run():
    examples = doc_commands()
    assert len(examples) >= 10, examples
    unknown = [f"{path}: {' '.join(words)}" for path, words in examples
               if not any(kind(words) for kind in RUNNERS.values())]
    assert not unknown, f"shell examples no test runs: {unknown}"


def test_the_readme_names_no_shell_command_it_cannot_keep():
    """The README's commands are the ones a newcomer types first: they must all be of a kind above."""
    readme = [words for path, words in doc_commands() if path == "README.md"]
    assert any(words == ["make", "run"] for words in readme) and any(words == ["make", "test"] for words in readme)
    assert any(is_pytest(words) and "not swarm" in words for words in readme)


def examples_of(kind) -> List[Tuple[str, List[str]]]:
    """The examples of one kind, each command once (where it first appears)."""
    examples = []
    for path, words in doc_commands():
        if kind(words) and words not in [seen for _, seen in examples]:
            examples.append((path, words))
    return examples


@pytest.fixture
def keyed_port(serve_with):
    """A port serving the app with the documentation's API key set."""
    return serve_with(api_key=DOC_API_KEY)


@pytest.mark.parametrize("example", examples_of(is_curl), ids=example_id)
async def test_curl_example_runs_as_written(example, ws_port, keyed_port, manager):
    from tests.helpers import wait_for_no_sessions

    _, words = example
    keyed = any("$SWARM_CHAT_API_KEY" in word for word in words)
    server = f"http://127.0.0.1:{keyed_port if keyed else ws_port}/"
    command = [word.replace("$SWARM_CHAT_API_KEY", DOC_API_KEY).replace(DOC_SERVER, server) for word in words]
    assert any(server in word for word in command), "the example names the documented server address"
    if any(word.startswith(("-d", "--data")) for word in command):
        assert "Content-Type: application/json" in command, "a body is sent as JSON, with its header"
    curl = await asyncio.create_subprocess_exec(
        *command, "-sS", "--fail-with-body", stdout=asyncio.subprocess.PIPE)
    stdout, _ = await asyncio.wait_for(curl.communicate(), 120)
    assert curl.returncode == 0, stdout
    reply = json.loads(stdout)
    if "choices" in reply:
        assert reply["choices"][0]["message"]["content"]
    elif reply.get("type") == "message":  # Anthropic's Messages API
        assert reply["content"][0]["text"]
    elif reply.get("object") == "response":  # OpenAI's Responses API
        assert reply["status"] in ("completed", "incomplete") and reply["output"][0]["content"][0]["text"]
    elif "input_tokens" in reply:  # its token count
        assert reply["input_tokens"] > 0
    else:
        assert reply["ok"] is True
    if "outputs" in reply:
        assert reply["outputs"] and not reply["outputs"].startswith("Once upon a time")  # only the new text
    await wait_for_no_sessions(manager)


def make_run_arguments(words: List[str]) -> List[str]:
    """The server arguments of ``make run [ARGS="..."]``: ``make run`` runs ``server.py $(ARGS)``."""
    arguments = []
    for word in words[2:]:
        assert word.startswith("ARGS="), f"make run takes its flags through ARGS: {words}"
        arguments += shlex.split(word[len("ARGS="):])
    return arguments


@pytest.mark.parametrize("example", examples_of(is_make_run), ids=example_id)
def test_make_run_example_parses(example):
    _, words = example
    arguments = [PLACEHOLDER_PEER.sub("/ip4/127.0.0.1/tcp/31337/p2p/QmExample", word)
                 for word in make_run_arguments(words)]
    parser = build_parser(environ={})
    parser.exit_on_error = False
    try:
        parser.parse_args(arguments)
    except SystemExit as error:  # argparse reports some errors by exiting
        pytest.fail(f"{' '.join(words)}: the server refuses these arguments ({error})")


@pytest.mark.parametrize("example", examples_of(is_other_make), ids=example_id)
def test_make_example_is_a_target(example):
    """Run as a dry run: make resolves the target and its variables but installs nothing."""
    _, words = example
    dry_run = subprocess.run([words[0], "-n", *words[1:]], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=60)
    assert dry_run.returncode == 0, dry_run.stderr


@pytest.mark.parametrize("example", examples_of(is_pytest), ids=example_id)
def test_pytest_example_selects_tests(example):
    """The documented pytest command, collecting only (running it would run the suite in the suite)."""
    _, words = example
    collect = subprocess.run([sys.executable, *words[1:], "--collect-only", "-q"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=600)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert re.search(r"^\d+(/\d+)? tests? (collected|selected)", collect.stdout, re.M), collect.stdout[-2000:]


def run_python_command(words: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *words[1:]], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("example", [example for example in examples_of(is_python_command)
                                     if not in_private_swarm_recipe(example[1])], ids=example_id)
def test_python_example_runs_as_written(example):
    _, words = example
    finished = run_python_command(words)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.strip(), "the example prints what it says"


def test_the_keys_commands_run_in_order_on_a_database_of_their_own(tmp_path):
    examples = examples_of(is_keys_command)
    assert any("add" in words for _, words in examples) and any("revoke" in words for _, words in examples)
    for _, words in examples:
        position = words.index("--db")
        command = [*words[:position + 1], str(tmp_path / "keys.db"), *words[position + 2:]]
        finished = run_python_command(command)
        assert finished.returncode == 0, (command, finished.stderr[-3000:])
        assert finished.stdout.strip(), f"{' '.join(words)} prints what it did"


def readme_python_examples() -> List[str]:
    return PYTHON_BLOCK.findall((REPO_ROOT / "README.md").read_text())


@pytest.mark.parametrize("source", readme_python_examples(), ids=lambda source: source.splitlines()[0][:40])
async def test_readme_python_example_runs_as_written(source, ws_port, manager):
    from tests.helpers import wait_for_no_sessions

    assert DOC_WEBSOCKET in source or DOC_SERVER in source, "the example names the documented server address"
    source = source.replace(DOC_WEBSOCKET, f"ws://127.0.0.1:{ws_port}/").replace(DOC_SERVER,
                                                                                   f"http://127.0.0.1:{ws_port}/")
    python = await asyncio.create_subprocess_exec(sys.executable, "-c", source, cwd=REPO_ROOT,
                                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(python.communicate(), 120)
    assert python.returncode == 0, stderr.decode()[-3000:]
    assert "{'ok': True}" in stdout.decode() and len(stdout.decode().strip()) > len("{'ok': True}"), stdout
    await wait_for_no_sessions(manager)


def node_command(words: List[str], port: int, peer: str) -> List[str]:
    """A documented node command as it can run here."""
    assert is_node(words), words
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
    import tornado.testing

    from tests.test_server_process import read_until_ready

    setup, model, first_words, second_words, server_words = private_swarm_commands()
    # The setup a fresh machine needs: the environment (a dry run here: .venv/ exists), then the
    # model folder the node commands name, made by the command as written.
    assert setup == ["make", "setup"]
    dry_run = subprocess.run(["make", "-n", "setup"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert dry_run.returncode == 0, dry_run.stderr
    made = run_python_command(model)
    assert made.returncode == 0, made.stderr[-3000:]
    model_folder = Path(made.stdout.strip().splitlines()[-1])
    assert model_folder.resolve() == (REPO_ROOT / first_words[4]).resolve()
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
        arguments = [PLACEHOLDER_PEER.sub(peer, word) for word in make_run_arguments(server_words)]
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


@pytest.mark.parametrize("words", [words for words in private_swarm_commands() if is_node(words)])
def test_node_examples_name_their_blocks_once(words):
    """petals refuses --num-blocks together with --block-indices."""
    assert not ("--num-blocks" in words and "--block-indices" in words)
