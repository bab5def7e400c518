"""Settings: defaults, environment variables, flags, device and dtype choice."""

from pathlib import Path

import pytest

from config import build_parser, choose_dtype, declared_settings, env_name, flag_of, parse_settings, settings_table
from model_specs import DEFAULT_MODEL_REPOSITORY
from swarm.node import petals_argv
from swarm.prefix import dht_prefix_for


def test_defaults_start_an_embedded_swarm_on_the_default_model():
    settings = parse_settings([], environ={})
    assert settings.embedded_swarm
    assert [spec.key for spec in settings.models] == [DEFAULT_MODEL_REPOSITORY]
    assert settings.port == 5000


def test_environment_sets_and_flags_override():
    environ = {"SWARM_CHAT_PORT": "6000", "SWARM_CHAT_INITIAL_PEERS": "/ip4/1.2.3.4/tcp/1/p2p/Qm /dns/x/tcp/2",
               "SWARM_CHAT_DEBUG": "true"}
    settings = parse_settings([], environ=environ)
    assert settings.port == 6000
    assert settings.initial_peers == ("/ip4/1.2.3.4/tcp/1/p2p/Qm", "/dns/x/tcp/2")
    assert settings.debug is True
    assert not settings.embedded_swarm
    assert parse_settings(["--port", "7000"], environ=environ).port == 7000


def test_model_flag_accepts_a_local_folder_and_a_repository(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    settings = parse_settings(["--model", str(folder), "org/Big-Model"], environ={})
    local, hub = settings.models
    assert local.path == folder.resolve() and local.swarm_prefix == "my-model-hf"
    assert hub.path is None and hub.key == "org/Big-Model" and hub.weights == "org/Big-Model"
    assert hub.swarm_prefix == "Big-Model-hf"


@pytest.mark.parametrize("source, prefix", [
    ("meta-llama/Llama-2-70b-chat-hf", "Llama-2-70b-chat-hf"),  # what petals' public servers announce
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3-1-8B-Instruct-hf"),  # a dot would split a block's name
    ("/data/Qwen2.5-0.5B-Instruct/", "Qwen2-5-0-5B-Instruct-hf"),
])
def test_nodes_and_clients_share_one_prefix_rule(source, prefix):
    assert dht_prefix_for(source) == prefix
    assert petals_argv(source, [])[-2:] == ["--dht_prefix", prefix]


def test_models_from_the_environment_are_replaced_by_the_flag():
    environ = {"SWARM_CHAT_MODEL": "org/A org/B"}
    assert [spec.key for spec in parse_settings([], environ=environ).models] == ["org/A", "org/B"]
    assert [spec.key for spec in parse_settings(["--model", "org/C"], environ=environ).models] == ["org/C"]


def test_the_model_flag_may_be_repeated_and_replaces_the_environment():
    environ = {"SWARM_CHAT_MODEL": "org/A"}
    settings = parse_settings(["--model", "org/B", "--model", "org/C", "org/D"], environ=environ)
    assert [spec.key for spec in settings.models] == ["org/B", "org/C", "org/D"]
    with pytest.raises(SystemExit, match="--model names 'org/B' twice"):
        parse_settings(["--model", "org/B", "--model", "org/B"], environ={})


def test_a_gguf_file_is_a_model_named_after_it_converted_at_start_up(tmp_path):
    gguf_file = tmp_path / "Tiny-Chat.Q4_1.gguf"
    gguf_file.write_bytes(b"GGUF")
    (spec,) = parse_settings(["--model", str(gguf_file)], environ={}).models
    assert spec.gguf and spec.path == gguf_file.resolve()
    assert spec.key == "Tiny-Chat.Q4_1" and spec.swarm_prefix == "Tiny-Chat-Q4_1-hf"
    assert spec.frontend.name == "Tiny-Chat.Q4_1" and spec.aliases == ()
    with pytest.raises(SystemExit, match="missing.gguf: no such file"):
        parse_settings(["--model", str(tmp_path / "missing.gguf")], environ={})


def test_models_dir_moves_the_default_model():
    settings = parse_settings(["--models-dir", "/somewhere"], environ={})
    assert settings.models[0].path == Path("/somewhere/SmolLM2-135M-Instruct")


@pytest.mark.parametrize(
    "device, avx512, expected",
    [("cuda", True, "float16"), ("cuda:1", False, "float16"), ("cpu", True, "bfloat16"), ("cpu", False, "float32")],
)
def test_dtype_follows_device_and_cpu(monkeypatch, device, avx512, expected):
    import cpufeature

    monkeypatch.setattr(cpufeature, "CPUFeature", {"AVX512f": avx512, "OS_AVX512": avx512})
    assert choose_dtype(device) == expected
    assert choose_dtype(device, "float32") == "float32"


def test_bad_executor_size_is_refused():
    with pytest.raises(SystemExit):
        parse_settings(["--executor-workers", "0"], environ={})


def test_the_draft_length_is_bounded_and_zero_turns_speculation_off():
    assert parse_settings([], environ={}).draft_tokens == 16
    assert parse_settings(["--draft-tokens", "0"], environ={}).draft_tokens == 0
    assert parse_settings([], environ={"SWARM_CHAT_DRAFT_TOKENS": "8"}).draft_tokens == 8
    for refused in ("-1", "128"):
        with pytest.raises(SystemExit, match="--draft-tokens must"):
            parse_settings(["--draft-tokens", refused], environ={})


def test_the_settings_table_in_the_docs_is_the_declared_one():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    begin, end = "<!-- settings table: generated from config.py -->\n", "<!-- end of settings table -->"
    written = docs[docs.index(begin) + len(begin):docs.index(end)]
    assert written == settings_table(), f"docs/operations.md's settings table should read:\n{settings_table()}"


def test_every_setting_has_its_flag_and_environment_variable():
    help_text = build_parser({}).format_help()
    for declared, how in declared_settings():
        assert flag_of(declared) in help_text and env_name(declared) in help_text
    environ = {env_name(declared): "7" for declared, _ in declared_settings() if declared.type in (int, float)}
    settings = parse_settings([], environ=environ)
    assert all(getattr(settings, declared.name) == 7 for declared, _ in declared_settings()
               if declared.type in (int, float))


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be at most 65535"),
    (["--max-sessions", "0"], "--max-sessions must be at least 1"),
    (["--idle-timeout", "0"], "--idle-timeout must be positive"),
    (["--warm-sessions", "-1"], "--warm-sessions must not be negative"),
    (["--trusted-proxies", "10.0.0.0/8", "not-a-network"], "--trusted-proxies: 'not-a-network' is not"),
])
def test_each_declared_bound_is_checked(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_settings(argv, environ={})


def test_a_choice_outside_the_declared_ones_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--log-level", "LOUD"], environ={})
    assert "invalid choice" in capsys.readouterr().err


def test_steps_in_flight_default_to_two_per_model_on_the_embedded_swarm_only():
    assert parse_settings([], environ={}).steps_in_flight_limit == 2  # the default model, one node
    assert parse_settings(["--model", "org/a", "org/b"], environ={}).steps_in_flight_limit == 4
    joined = parse_settings(["--initial-peers", "/ip4/10.0.0.5/tcp/31337/p2p/Qm"], environ={})
    assert joined.steps_in_flight_limit == 0  # one per executor worker
    assert parse_settings(["--steps-in-flight", "5"], environ={}).steps_in_flight_limit == 5
