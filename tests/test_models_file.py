"""Models declared in a TOML file (``--models-file``): every key read, every mistake refused in one
line naming the file, the entry and the key; GGUF files converted at start-up; a model that cannot
be served refused at start-up in one line, listed as unavailable and refused with its reason while
the server serves the others."""

import asyncio
import json
import logging
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from config import parse_settings
from model_specs import ChatSettings, ModelSpec
from models_file import CHAT_KEYS, ENTRY_KEYS, GENERATION_PARAMS, ModelsFileError, read_models_file
from tests.conftest import REPO_ROOT
from tests.test_server_process import read_until_ready
from tests.ws_client import WSClient

EXAMPLE = REPO_ROOT / "models.example.toml"
GEMMA = {"model_type": "gemma"}  # a family this server cannot serve (no config class for it here)
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_hidden_layers": 2, "vocab_size": 100}
GEMMA_REFUSAL = "model type 'gemma' is unknown"


def model_folder(root: Path, name: str, config: dict) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def models_file(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "models.toml"
    file.write_text(text)
    return file


# --- Reading the file ---------------------------------------------------------------------------

def test_the_example_file_loads_as_it_reads():
    llama, bloomz = parse_settings(["--models-file", str(EXAMPLE)], environ={}).models
    assert llama.key == "meta-llama/Llama-2-7b-chat-hf" and llama.names()[1:] == ("llama2", "llama-2-chat")
    assert llama.swarm_prefix == "Llama-2-7b-chat-hf" and llama.path is None
    assert (llama.family, llama.frontend.name) == ("Llama 2", "Llama 2 7B Chat")
    assert llama.chat == ChatSettings(max_session_length=4096, sep_token="</s>", stop_token="</s>",
                                      extra_stop_sequences=("\nUser:",),
                                      generation_params={"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert (llama.max_new_tokens_limit, llama.default_max_tokens) == (1024, 512)
    assert bloomz.names() == ("bigscience/bloomz-560m", "bloomz") and bloomz.public_api is False
    assert bloomz.chat == ChatSettings()


def test_the_example_file_shows_every_key():
    text = EXAMPLE.read_text()
    assert "\n[models.chat]" in text
    for key in (*(key for key in ENTRY_KEYS if key != "chat"), *CHAT_KEYS, *GENERATION_PARAMS):
        assert re.search(rf"\b{key} = ", text), key


def test_every_key_of_an_entry_is_read(tmp_path):
    weights = model_folder(tmp_path, "weights", LLAMA)
    (tmp_path / "small.Q4_0.gguf").write_bytes(b"GGUF")
    file = models_file(tmp_path, """
        # Written by hand: comments are fine.
        [[models]]
        repository = "org/Chat-7B"
        path = "weights"  # relative to this file
        dht_prefix = "chat-7b-private"
        adapter = "org/chat-7b-lora"
        aliases = ["chat", "c7"]
        family = "Chat"
        name = "Chat 7B"
        model_card = "https://example.org/card"
        license = ""
        public_api = false
        max_new_tokens_limit = 300
        default_max_tokens = 200
        max_session_length = 1024

        [models.chat]
        sep_token = ""
        stop_token = "<|end|>"
        extra_stop_sequences = ["<|user|>", "\\nUser:"]
        generation_params = { do_sample = false, temperature = 0, top_p = 1 }

        [[models]]
        path = "small.Q4_0.gguf"
    """)
    chat, small = read_models_file(file)
    assert chat.key == "org/chat-7b-lora" and chat.repository == "org/Chat-7B"
    assert chat.names() == ("org/chat-7b-lora", "chat", "c7")
    assert chat.path == weights and chat.weights == str(weights) and not chat.gguf
    assert chat.swarm_prefix == "chat-7b-private"
    assert (chat.family, chat.frontend.name, chat.frontend.model_card, chat.frontend.license) == \
        ("Chat", "Chat 7B", "https://example.org/card", "")
    assert (chat.public_api, chat.max_new_tokens_limit, chat.default_max_tokens) == (False, 300, 200)
    assert chat.chat == ChatSettings(max_session_length=1024, sep_token="", stop_token="<|end|>",
                                     extra_stop_sequences=("<|user|>", "\nUser:"),
                                     generation_params={"do_sample": False, "temperature": 0, "top_p": 1})
    # A GGUF file alone: named after the file, converted at start-up, default settings otherwise.
    assert small.gguf and small.path == tmp_path / "small.Q4_0.gguf"
    assert small.key == "small.Q4_0" and small.swarm_prefix == "small-Q4_0-hf"
    assert small.chat == ChatSettings() and small.aliases == () and small.public_api
    assert (small.max_new_tokens_limit, small.default_max_tokens) == \
        (ModelSpec.max_new_tokens_limit, ModelSpec.default_max_tokens)


BAD_ENTRIES = [
    # (the [[models]] tables, the mistake as reported after the file's name)
    ('repository = "a"\nmax_tokens = 3', "entry 1 (a): max_tokens: unknown key (known: adapter, aliases"),
    ('name = "No weights"', "entry 1: repository: missing: an entry names a hub repository, a local path"),
    ("repository = 3", "entry 1: repository: must be a string, not an integer"),
    ('repository = ""', "entry 1: repository: must not be empty"),
    ('repository = "a"\naliases = "b"', "entry 1 (a): aliases: must be a list of strings, not a string"),
    ('repository = "a"\naliases = ["b", 3]', "entry 1 (a): aliases[1]: must be a string, not an integer"),
    ('repository = "a"\npublic_api = "yes"', "entry 1 (a): public_api: must be true or false, not a string"),
    ('repository = "a"\nmax_new_tokens_limit = 1.5',
     "entry 1 (a): max_new_tokens_limit: must be an integer, not a float"),
    ('repository = "a"\ndefault_max_tokens = true',
     "entry 1 (a): default_max_tokens: must be an integer, not a boolean"),
    ('repository = "a"\nmax_session_length = 0', "entry 1 (a): max_session_length: must be at least 1, not 0"),
    ('repository = "a"\nmax_new_tokens_limit = -5', "entry 1 (a): max_new_tokens_limit: must be at least 1, not -5"),
    ('repository = "a"\ndht_prefix = "my.model"', "entry 1 (a): dht_prefix: 'my.model' must hold no dot"),
    ('repository = "a"\nchat = 3', "entry 1 (a): chat: must be a table, not an integer"),
    ('repository = "a"\n[models.chat]\nstop = "x"', "entry 1 (a): chat.stop: unknown key (known: extra_stop_sequences"),
    ('repository = "a"\n[models.chat]\nmax_session_length = 9', "entry 1 (a): chat.max_session_length: belongs to the "
                                                               "model's own table"),
    ('repository = "a"\n[models.chat]\nstop_token = ""', "entry 1 (a): chat.stop_token: must not be empty"),
    ('repository = "a"\n[models.chat]\nextra_stop_sequences = [""]',
     "entry 1 (a): chat.extra_stop_sequences[0]: must not be empty"),
    ('repository = "a"\n[models.chat]\ngeneration_params = { top_k = 5 }',
     "entry 1 (a): chat.generation_params.top_k: unknown key (known: do_sample, temperature, top_p)"),
    ('repository = "a"\n[models.chat]\ngeneration_params = { temperature = "hot" }',
     "entry 1 (a): chat.generation_params.temperature: must be a number, not a string"),
    ('repository = "a"\n[models.chat]\ngeneration_params = { temperature = 2.5 }',
     "entry 1 (a): chat.generation_params.temperature: must be in [0, 2], not 2.5"),
    ('repository = "a"\n[models.chat]\ngeneration_params = { top_p = 0 }',
     "entry 1 (a): chat.generation_params.top_p: must be in (0, 1], not 0"),
    ('repository = "a"\n[models.chat]\ngeneration_params = { do_sample = 1 }',
     "entry 1 (a): chat.generation_params.do_sample: must be true or false, not an integer"),
    ('path = "missing"', "entry 1 (missing): path: {dir}/missing does not exist"),
    ('path = "notes.txt"', "entry 1 (notes.txt): path: {dir}/notes.txt is neither a folder nor a .gguf file"),
    ('repository = "a"\n[[models]]\nrepository = "b"\nlicense = 1', "entry 2 (b): license: must be a string"),
    # Names that would select two models, or one name given twice.
    ('repository = "a"\n[[models]]\nrepository = "a"', "entry 2 (a): repository: 'a' already names entry 1 (a)"),
    ('repository = "a"\n[[models]]\nrepository = "b"\naliases = ["a"]',
     "entry 2 (b): aliases: 'a' already names entry 1 (a)"),
    ('repository = "a"\naliases = ["x"]\n[[models]]\nrepository = "b"\naliases = ["x"]',
     "entry 2 (b): aliases: 'x' already names entry 1 (a)"),
    ('repository = "a"\naliases = ["x"]\n[[models]]\npath = "x"', "entry 2 (x): path: 'x' already names entry 1 (a)"),
    ('repository = "a"\naliases = ["x", "x"]', "entry 1 (a): aliases: 'x' is given twice in this entry"),
]


@pytest.mark.parametrize("entries, mistake", BAD_ENTRIES)
def test_a_mistake_is_refused_naming_the_file_the_entry_and_the_key(tmp_path, entries, mistake):
    model_folder(tmp_path, "x", LLAMA)
    (tmp_path / "notes.txt").write_text("not a model")
    file = models_file(tmp_path, "[[models]]\n" + entries + "\n")
    with pytest.raises(ModelsFileError) as refused:
        read_models_file(file)
    assert str(refused.value).startswith(f"{file}: [[models]] " + mistake.format(dir=tmp_path))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("text, mistake", [
    ("[[models]\n", "not valid TOML: "),
    ("# nothing yet\n", "declares no model; declare each one in a [[models]] table"),
    ('models = ["org/a"]\n', "declares no model"),
    ('model = "org/a"\n', "unknown top-level key 'model' (each model is a [[models]] table)"),
])
def test_a_file_that_declares_no_model_is_refused(tmp_path, text, mistake):
    file = models_file(tmp_path, text)
    with pytest.raises(ModelsFileError, match="^" + re.escape(f"{file}: ")) as refused:
        read_models_file(file)
    assert mistake in str(refused.value)


def test_the_settings_come_from_the_file_named_by_flag_or_environment(tmp_path):
    file = models_file(tmp_path, '[[models]]\nrepository = "org/a"\naliases = ["a"]\n')
    by_flag = parse_settings(["--models-file", str(file)], environ={})
    by_environment = parse_settings([], environ={"SWARM_CHAT_MODELS_FILE": str(file)})
    assert by_flag.models == by_environment.models and by_flag.models[0].names() == ("org/a", "a")
    assert by_flag.models_file == by_environment.models_file == file
    with pytest.raises(SystemExit, match="--model and --models-file both name the models to serve"):
        parse_settings(["--model", "org/b"], environ={"SWARM_CHAT_MODELS_FILE": str(file)})
    with pytest.raises(SystemExit, match=f"^{tmp_path}/missing.toml: cannot read it"):
        parse_settings(["--models-file", str(tmp_path / "missing.toml")], environ={})


def test_the_server_exits_with_the_one_line(tmp_path):
    file = models_file(tmp_path, '[[models]]\nrepository = "org/a"\nmax_session_length = 0\n')
    finished = subprocess.run([sys.executable, "server.py", "--models-file", str(file)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    ours = [line for line in finished.stderr.splitlines() if str(file) in line]
    assert ours == [f"{file}: [[models]] entry 1 (org/a): max_session_length: must be at least 1, not 0"]
    assert "Traceback" not in finished.stderr


# --- Start-up: GGUF files converted, models that cannot be served refused ------------------------

def test_a_gguf_file_is_converted_once_at_start_up_into_the_models_dir(tmp_path, monkeypatch):
    import swarm.convert_gguf
    from server import prepare_models

    gguf_file = tmp_path / "Small-Chat.Q8_0.gguf"
    gguf_file.write_bytes(b"GGUF")
    converted = model_folder(tmp_path, "converted", LLAMA)
    calls = []

    def convert_gguf_once(gguf_path, cache_dir):
        calls.append((Path(gguf_path), Path(cache_dir)))
        return converted

    monkeypatch.setattr(swarm.convert_gguf, "convert_gguf_once", convert_gguf_once, raising=False)
    settings = parse_settings(["--model", str(gguf_file), "--models-dir", str(tmp_path / "cache")], environ={})
    assert calls == []  # reading the settings converts nothing
    (model,), refusals = prepare_models(settings)
    assert calls == [(gguf_file, tmp_path / "cache")]
    assert refusals == {}
    assert model.path == converted and model.weights == str(converted) and not model.gguf
    assert model.key == "Small-Chat.Q8_0" and model.swarm_prefix == "Small-Chat-Q8_0-hf"


def test_a_gguf_file_the_converter_refuses_is_refused_in_one_line(tmp_path, monkeypatch, caplog):
    import swarm.convert_gguf
    from server import prepare_models

    gguf_file = tmp_path / "qwen.gguf"
    gguf_file.write_bytes(b"GGUF")

    def convert_gguf_once(gguf_path, cache_dir):
        raise ValueError("unsupported GGUF architecture 'qwen2': only 'llama' can be converted")

    monkeypatch.setattr(swarm.convert_gguf, "convert_gguf_once", convert_gguf_once, raising=False)
    with caplog.at_level(logging.ERROR, logger="server"):
        (model,), refusals = prepare_models(parse_settings(["--model", str(gguf_file)], environ={}))
    assert refusals == {"qwen": f"Cannot serve {gguf_file}: unsupported GGUF architecture 'qwen2': "
                                "only 'llama' can be converted"}
    assert [record.getMessage() for record in caplog.records] == [refusals["qwen"]]


def test_each_model_that_cannot_be_served_is_refused_and_the_others_kept(tmp_path, caplog):
    from server import prepare_models

    gemma = model_folder(tmp_path, "gemma-2b", GEMMA)
    llama = model_folder(tmp_path, "llama", LLAMA)
    file = models_file(tmp_path, '[[models]]\npath = "gemma-2b"\n[[models]]\npath = "llama"\n')
    with caplog.at_level(logging.ERROR, logger="server"):
        models, refusals = prepare_models(parse_settings(["--models-file", str(file)], environ={}))
    assert [spec.path for spec in models] == [gemma, llama]
    assert list(refusals) == ["gemma-2b"] and GEMMA_REFUSAL in refusals["gemma-2b"]
    assert "qwen3 (Qwen3 (dense))" in refusals["gemma-2b"]  # it names what is served
    assert [record.getMessage() for record in caplog.records] == [refusals["gemma-2b"]]


def test_the_server_exits_when_no_declared_model_can_be_served(tmp_path):
    model_folder(tmp_path, "gemma-a", GEMMA)
    model_folder(tmp_path, "gemma-b", GEMMA)
    file = models_file(tmp_path, '[[models]]\npath = "gemma-a"\n[[models]]\npath = "gemma-b"\n')
    finished = subprocess.run([sys.executable, "server.py", "--models-file", str(file), "--port", "0"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    refusals = [line for line in finished.stderr.splitlines() if GEMMA_REFUSAL in line]
    assert len(refusals) == 2 and "gemma-a" in refusals[0] and "gemma-b" in refusals[1]
    assert "Traceback" not in finished.stderr and "embedded swarm" not in finished.stderr


# --- A server process serving a models file ------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_specs, default_model_dir, local_swarm):
    """server.py joined to the test swarm, serving a models file: a model it cannot serve (declared
    first), the tiny Llama under another name, an alias and settings of its own, and the tiny Llama
    again as a GGUF file (named so that its blocks are the test swarm's)."""
    from tests.gguf_writer import write_gguf

    root = tmp_path_factory.mktemp("models-file")
    model_folder(root, "gemma-2b", GEMMA)
    write_gguf(tiny_model_specs[0].path, default_model_dir, root / "tiny-llama.gguf", "smollm")
    file = models_file(root, f"""
        [[models]]
        path = "gemma-2b"
        aliases = ["gemma"]
        name = "Gemma 2B"

        [[models]]
        repository = "example/file-declared-llama"
        path = "{tiny_model_specs[0].path}"
        dht_prefix = "tiny-llama-hf"  # where the test swarm serves its blocks
        aliases = ["tiny"]
        family = "From the file"
        name = "Tiny Llama from a file"
        max_session_length = 200
        max_new_tokens_limit = 7

        [models.chat]
        stop_token = "<|im_end|>"
        extra_stop_sequences = ["\\nUser:"]
        generation_params = {{ do_sample = true, temperature = 0.3, top_p = 0.8 }}

        [[models]]
        path = "tiny-llama.gguf"
        aliases = ["tiny-gguf"]
    """)
    process = subprocess.Popen(
        [sys.executable, "server.py", "--models-file", str(file), "--port", "0", "--host", "127.0.0.1",
         "--models-dir", str(root / "converted"), "--initial-peers", *local_swarm.initial_peers],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        url, log = read_until_ready(process)
        yield url, log
    finally:
        process.terminate()
        process.communicate(timeout=60)


def fetch(url: str, body: dict = None) -> tuple:
    """(status, JSON body) of a GET, or of a POST of ``body``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_refusal_is_one_line_of_the_start_up_log(served):
    _, log = served
    refusals = [line for line in log if GEMMA_REFUSAL in line]
    assert len(refusals) == 1 and "gemma-2b" in refusals[0] and "qwen3" in refusals[0]
    assert not any("Traceback" in line for line in log)


def test_the_model_list_shows_the_file_and_the_refused_model(served):
    url, _ = served
    status, body = fetch(url + "api/v1/models")
    assert status == 200
    gemma, llama, gguf = body["models"]
    assert gemma["model"] == "gemma-2b" and gemma["aliases"] == ["gemma"] and gemma["available"] is False
    assert GEMMA_REFUSAL in gemma["error"] and "qwen3" in gemma["error"]
    assert gemma["frontend"]["name"] == "Gemma 2B" and "chat" not in gemma and "num_blocks" not in gemma
    assert llama["model"] == "example/file-declared-llama" and llama["aliases"] == ["tiny"]
    assert llama["available"] is True and "error" not in llama
    assert (llama["family"], llama["frontend"]["name"], llama["num_blocks"]) == \
        ("From the file", "Tiny Llama from a file", 4)
    chat = llama["chat"]
    assert (chat["max_session_length"], chat["stop_token"], chat["extra_stop_sequences"]) == \
        (200, "<|im_end|>", ["\nUser:"])
    assert chat["generation_params"] == {"do_sample": True, "temperature": 0.3, "top_p": 0.8}
    assert chat["format"]["stop_sequences"] == ["<|im_end|>", "\nUser:"]
    assert (gguf["model"], gguf["aliases"], gguf["available"], gguf["num_blocks"]) == \
        ("tiny-llama", ["tiny-gguf"], True, 4)
    # The OpenAI API lists only what it can serve.
    status, body = fetch(url + "v1/models")
    assert [entry["id"] for entry in body["data"]] == ["example/file-declared-llama", "tiny-llama"]


def test_a_gguf_file_is_converted_at_start_up_and_serves_the_model_it_holds(served):
    url, log = served
    assert any("Converting" in line and "tiny-llama.gguf" in line for line in log)
    replies = []
    for name in ("tiny", "tiny-gguf"):  # the folder the file was written from, and the file
        status, body = fetch(url + "api/v1/generate", {"model": name, "inputs": "Once upon a time",
                                                       "max_new_tokens": 6, "do_sample": 0})
        assert status == 200 and body["ok"]
        replies.append(body["outputs"])
    assert replies[0] and replies[1] == replies[0]


def test_the_declared_model_generates_by_its_alias_within_its_limits(served):
    url, _ = served
    status, body = fetch(url + "api/v1/generate", {"model": "tiny", "inputs": "Once upon", "max_new_tokens": 3})
    assert status == 200 and body["ok"] and isinstance(body["outputs"], str)
    # No model named: the first one served (the refused one is declared first).
    status, body = fetch(url + "api/v1/generate", {"inputs": "Once upon", "max_new_tokens": 2})
    assert status == 200 and body["ok"]
    status, body = fetch(url + "api/v1/generate", {"model": "tiny", "inputs": "Once upon", "max_new_tokens": 8})
    assert status == 400 and "exceeds this model's limit of 7" in body["traceback"]


def assert_refused_with_the_reason(message: str) -> None:
    assert message.startswith("Model 'gemma-2b' is declared but not available: Cannot serve ")
    assert GEMMA_REFUSAL in message and "qwen3" in message
    assert "Unknown model" not in message


@pytest.mark.parametrize("name", ["gemma", "gemma-2b"])
def test_a_generation_naming_the_refused_model_gets_the_reason(served, name):
    url, _ = served
    status, body = fetch(url + "api/v1/generate", {"model": name, "inputs": "Hi", "max_new_tokens": 1})
    assert (status, body["code"]) == (400, "model_unavailable")
    assert_refused_with_the_reason(body["traceback"])

    status, body = fetch(url + "v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "model"
    assert_refused_with_the_reason(body["error"]["message"])

    async def open_session():
        client = await WSClient.connect(int(url.rstrip("/").rsplit(":", 1)[1]))
        try:
            return await client.request({"type": "open_inference_session", "model": name, "max_length": 64})
        finally:
            client.close()

    loop = asyncio.new_event_loop()
    reply = loop.run_until_complete(open_session())
    loop.close()
    assert reply["ok"] is False and reply["code"] == "model_unavailable"
    assert_refused_with_the_reason(reply["traceback"])


def test_the_chat_page_greys_out_the_refused_model(served):
    from tests.browser import ChatPage, start_chromium

    url, _ = served
    chromium = start_chromium()
    try:
        page = ChatPage(chromium, url)
        page.open()
        options = chromium.execute_script(
            "return [...document.querySelectorAll('#model option')].map((option) =>"
            " [option.parentElement.label, option.text, option.disabled, option.title])")
        assert options[0][:3] == ["gemma-2b", "Gemma 2B (unavailable)", True]
        assert GEMMA_REFUSAL in options[0][3]
        assert options[1:] == [["From the file", "Tiny Llama from a file", False, ""],
                               ["tiny-llama", "tiny-llama", False, ""]]
        assert page.model_name() == "Tiny Llama from a file"  # the first model served is chosen
    finally:
        chromium.quit()


def test_the_documented_example_declares_what_it_says(tmp_path):
    doc = (REPO_ROOT / "docs" / "operations.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "qwen").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "Llama-3.2-1B-Instruct-F16.gguf").write_bytes(b"GGUF")  # converted at start-up only
    models_file = tmp_path / "models.toml"
    models_file.write_text(example.replace('"/data/Qwen2.5-7B-Instruct"', json.dumps(str(tmp_path / "qwen"))))
    qwen, llama = read_models_file(models_file)
    assert (qwen.key, qwen.aliases, qwen.frontend.name, qwen.chat.max_session_length) == (
        "Qwen/Qwen2.5-7B-Instruct", ("qwen",), "Qwen2.5 7B Instruct", 8192)
    assert qwen.chat.generation_params == {"do_sample": True, "temperature": 0.7, "top_p": 0.8}
    assert (llama.key, llama.aliases, llama.gguf) == ("Llama-3.2-1B-Instruct-F16", ("llama",), True)
    assert llama.swarm_prefix == "Llama-3-2-1B-Instruct-F16-hf"
