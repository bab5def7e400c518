"""A coding agent's own command-line client against this server: OpenAI's Codex CLI (the version the
Makefile installs into .venv/agent-cli) runs one turn through ``/v1/responses`` in which it runs a
shell command the model calls for and sends the result back, as it would against OpenAI.

Codex sends its real prompt (about 30,000 characters: its instructions and 7 function tools, some
6,400 tokens once rendered) and nothing else: it needs no login and calls no other endpoint. The model
is ``tests.scripted_model``'s, whose weights are set so that it calls the shell tool with ``echo
walnut`` and, once that call is in the conversation, answers ``Done``; it serves 8,192 positions
on a node of its own.
"""

import asyncio
import dataclasses
import json
import os
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.testing

from config import Settings
from model_specs import ChatSettings, FrontendSettings, ModelSpec
from tests.conftest import REPO_ROOT
from tests.scripted_model import CUE_WORD, make_scripted_llama

CODEX = REPO_ROOT / ".venv" / "agent-cli" / "node_modules" / ".bin" / "codex"
MODEL = "tests/scripted-agent"
KEY = "agent-cli-key"
COMMAND = "echo" + CUE_WORD
# Codex's settings for this server, as docs/api.md gives them: the server as a model provider, and its two
# tools that are not functions turned off (sub-agents come as a "namespace" tool, web search is OpenAI's own);
# and, since a test sends nothing elsewhere, no usage analytics and no update check.
CODEX_SETTINGS = {
    "model": MODEL, "model_provider": "swarm", "model_providers.swarm.name": "swarm chat",
    "model_providers.swarm.wire_api": "responses", "model_providers.swarm.env_key": "SWARM_CHAT_KEY",
    "features.multi_agent": False, "web_search": "disabled",
    "analytics.enabled": False, "check_for_update_on_startup": False,
}
RUN_TIMEOUT = 120


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory, default_model_dir, io_loop):
    """``(port, seen)``: an app serving the scripted model, with ``--api-key``, on a swarm node of its own;
    ``seen`` gets each request it answered: (method, path, status, headers, body)."""
    from server import make_app
    from sessions.serving.manager import build_manager
    from swarm.local import LocalSwarm, SwarmModel, count_blocks

    if not CODEX.exists():
        pytest.skip(f"{CODEX} is not installed (make test installs it)")
    root = tmp_path_factory.mktemp("agent")
    path = make_scripted_llama(root / "scripted-agent", default_model_dir)
    spec = ModelSpec(repository=MODEL, family="Tests", path=path, frontend=FrontendSettings(name="Scripted agent"),
                     chat=ChatSettings(max_session_length=8192, stop_token="<|im_end|>"))
    settings = Settings(models=(spec,), port=0, device="cpu", torch_dtype="float32", api_key=KEY)
    with LocalSwarm(root / "logs", threads=1) as swarm:
        model = SwarmModel(str(path), spec.swarm_prefix, count_blocks(str(path)))
        swarm.add_node(model, block_indices=f"0:{model.num_blocks}")  # named blocks: no wait to choose them
        swarm.wait_until_ready([model], timeout=120)
        settings = dataclasses.replace(settings, initial_peers=tuple(swarm.initial_peers))
        manager = build_manager(settings.models, settings.initial_peers, settings.device, settings.torch_dtype,
                                settings=settings)
        io_loop.run_sync(manager.start)
        seen = []
        app = make_app(settings, manager)
        app.settings["log_function"] = lambda handler: seen.append((
            handler.request.method, handler.request.path, handler.get_status(), dict(handler.request.headers),
            json.loads(handler.request.body or b"null")))
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_socket(sock)
        try:
            yield port, seen
        finally:
            server.stop()
            io_loop.run_sync(server.close_all_connections)
            io_loop.run_sync(manager.close)


async def run_codex(port: int, workdir: Path, home: Path, prompt: str) -> tuple:
    """Codex's exit status and the events it printed (``codex exec --json``)."""
    options = [f"model_providers.swarm.base_url={json.dumps(f'http://127.0.0.1:{port}/v1')}"]
    options += [f"{name}={json.dumps(value)}" for name, value in CODEX_SETTINGS.items()]
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home), "SWARM_CHAT_KEY": KEY}
    process = await asyncio.create_subprocess_exec(
        str(CODEX), "exec", "--json", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
        *[argument for option in options for argument in ("-c", option)], prompt,
        cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    except asyncio.TimeoutError:
        process.kill()
        raise
    return process.returncode, [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")], err


async def test_codex_runs_the_shell_command_the_model_calls_and_sends_the_result_back(agent_server, tmp_path):
    port, seen = agent_server
    (tmp_path / "work").mkdir()
    (tmp_path / "home").mkdir()
    status, events, err = await run_codex(port, tmp_path / "work", tmp_path / "home",
                                          "Run a shell command, then say that you are done.")
    assert status == 0, err.decode()[-2000:]

    # What the client did: ran the call our reply made, and ended its turn with our second reply's text.
    commands = [event["item"] for event in events
                if event["type"] == "item.completed" and event["item"]["type"] == "command_execution"]
    assert [(item["exit_code"], item["aggregated_output"]) for item in commands] == [(0, CUE_WORD.strip() + "\n")]
    assert COMMAND in commands[0]["command"]
    messages = [event["item"]["text"] for event in events
                if event["type"] == "item.completed" and event["item"]["type"] == "agent_message"]
    assert messages == ["Done"]
    assert events[-1]["type"] == "turn.completed"

    # What the server saw: two streamed requests with the key, the second with the call and its result.
    assert [(method, path, status) for method, path, status, _, _ in seen] == [
        ("POST", "/v1/responses", 200), ("POST", "/v1/responses", 200)]
    (_, _, _, headers, first), (_, _, _, _, second) = seen
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert first["stream"] is True and first["model"] == MODEL
    assert {tool["name"] for tool in first["tools"]} >= {"exec_command"}
    assert not [item for item in first["input"] if item.get("type") == "function_call_output"]
    assert len(json.dumps(first)) > 10_000  # the client's real instructions, not a short test prompt
    assert second["input"][:len(first["input"])] == first["input"]
    [call] = [item for item in second["input"] if item.get("type") == "function_call"]
    [result] = [item for item in second["input"] if item.get("type") == "function_call_output"]
    assert call["name"] == "exec_command" and json.loads(call["arguments"]) == {"cmd": COMMAND}
    assert result["call_id"] == call["call_id"]
    assert CUE_WORD.strip() in result["output"]
