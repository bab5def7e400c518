"""The chat format the server owns, against real tokenizers (no swarm)."""

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model_specs import ChatSettings, default_model
from sessions.errors import InvalidRequest
from sessions.formats.chat_format import ChatFormat, RoleMarkers

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
REPO_ROOT = Path(__file__).resolve().parent.parent
DECLARED_CHAT = ChatSettings(sep_token="</s>\n", stop_token="</s>", extra_stop_sequences=("\nUser:",))

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer like a pirate."}, {"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "A conversation."}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Two\nlines, ünïcödé and <b>tags</b>"},
     {"role": "assistant", "content": " leading space and trailing newline\n"},
     {"role": "user", "content": ""}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"}],
]


@pytest.fixture(scope="module")
def smollm2(default_model_dir):
    """SmolLM2's tokenizer, with its ChatML chat template."""
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def smollm2_format(smollm2, models_dir) -> ChatFormat:
    spec = default_model(models_dir)
    return ChatFormat.for_model(smollm2, spec.chat, spec.chat.stop_token)


@pytest.fixture
def bare_tokenizer(default_model_dir):
    """A tokenizer without a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.chat_template = None
    return tokenizer


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system-user", "mixed", "no-system-turns"])
def test_smollm2_format_renders_as_its_template(smollm2, smollm2_format, conversation, add_generation_prompt):
    expected = smollm2.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smollm2_format.render(conversation, add_generation_prompt) == expected


def test_smollm2_markers_and_default_system_come_from_its_template(smollm2_format):
    assert smollm2_format.roles == {
        "system": RoleMarkers("<|im_start|>system\n", "<|im_end|>\n"),
        "user": RoleMarkers("<|im_start|>user\n", "<|im_end|>\n"),
        "assistant": RoleMarkers("<|im_start|>assistant\n", "<|im_end|>\n"),
    }
    assert smollm2_format.generation_prefix == "<|im_start|>assistant\n"
    assert smollm2_format.default_system == SMOLLM2_SYSTEM
    assert smollm2_format.stop_token == "<|im_end|>"
    assert smollm2_format.stop_sequences == ("<|im_end|>", "<|endoftext|>")
    # The default system text is written only when the conversation brings none.
    assert SMOLLM2_SYSTEM in smollm2_format.render(CONVERSATIONS[0])
    assert SMOLLM2_SYSTEM not in smollm2_format.render(CONVERSATIONS[1])


def test_without_a_template_the_declared_format_is_used(bare_tokenizer):
    chat_format = ChatFormat.for_model(bare_tokenizer, DECLARED_CHAT, "</s>")
    conversation = CONVERSATIONS[2]
    # What the OpenAI API wrote before the format was shared: "Role: text" turns, then "Assistant:".
    turns = [f"{message['role'].capitalize()}: {message['content']}" for message in conversation]
    assert chat_format.render(conversation) == "</s>\n".join(turns) + "</s>\n" + "Assistant:"
    assert chat_format.render(conversation, add_generation_prompt=False) == "".join(t + "</s>\n" for t in turns)
    assert chat_format.default_system is None
    assert chat_format.roles["user"] == RoleMarkers("User: ", "</s>\n")
    assert chat_format.stop_sequences == ("</s>", "\nUser:")


@pytest.mark.parametrize("template", [
    # Llama 3's shape: a BOS text before the first message, whatever its role.
    "{{ bos_token }}{% for m in messages %}{{ '<|role|>' + m['role'] + '\n' + m['content'] + '<|eot|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|role|>assistant\n' }}{% endif %}",
    # Gemma's shape: no system role at all.
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<turn>' + m['role'] + '\n' + m['content'] + '<end>\n' }}{% endfor %}",
    # Llama 2's shape: the system text inside the first user message.
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '[INST] <<SYS>>' + m['content'] + '<</SYS>> ' }}"
    "{% elif m['role'] == 'user' %}{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'system' %}"
    "{{ '[INST] ' }}{% endif %}{{ m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' </s>' }}"
    "{% endif %}{% endfor %}",
], ids=["bos-first", "no-system-role", "system-inside-user"])
def test_a_template_that_prefixes_and_suffixes_cannot_reproduce_falls_back(bare_tokenizer, template):
    bare_tokenizer.chat_template = template
    chat_format = ChatFormat.for_model(bare_tokenizer, DECLARED_CHAT, "</s>")
    assert chat_format == ChatFormat.declared(DECLARED_CHAT, "</s>", ("</s>", "\nUser:"))


def test_a_template_that_writes_the_last_reply_apart_is_derived_for_conversations_that_end_with_a_turn(
        bare_tokenizer):
    # Qwen3's shape: a reply after the last question opens with its thinking, earlier ones do not.
    bare_tokenizer.chat_template = (
        "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}"
        "{{ '<|' + m['role'] + '|>' }}{% if m['role'] == 'assistant' and loop.index0 > ns.last %}"
        "{{ '<think></think>' }}{% endif %}{{ m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    chat_format = ChatFormat.for_model(bare_tokenizer, DECLARED_CHAT, "</s>")
    assert chat_format.roles["assistant"] == RoleMarkers("<|assistant|>", "<|end|>")
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"}]
    assert chat_format.render(conversation) == "<|user|>Hi<|end|><|assistant|>Hello<|end|><|user|>Bye<|end|><|assistant|>"


def test_a_template_of_role_markers_is_derived(bare_tokenizer):
    bare_tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    chat_format = ChatFormat.for_model(bare_tokenizer, DECLARED_CHAT, "</s>")
    assert chat_format.roles["system"] == RoleMarkers("<|system|>\n", "<|im_end|>\n")
    assert chat_format.generation_prefix == "<|assistant|>\n" and chat_format.default_system is None
    for conversation in CONVERSATIONS:
        assert chat_format.render(conversation) == bare_tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True)


def test_a_template_written_for_the_hub_s_environment_is_derived(bare_tokenizer):
    # Loop controls and ``strftime_now``, as templates on the model hub use them.
    bare_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>' + strftime_now('%Y') + '\n' + m['content'] "
        "+ '<|end|>\n' }}{% continue %}{% endif %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    chat_format = ChatFormat.for_model(bare_tokenizer, DECLARED_CHAT, "</s>")
    assert chat_format.roles["system"] == RoleMarkers(f"<|system|>{datetime.now().year}\n", "<|end|>\n")
    assert chat_format.roles["user"] == RoleMarkers("<|user|>\n", "<|end|>\n")


def test_describe_round_trips_through_json(smollm2, smollm2_format):
    description = json.loads(json.dumps(smollm2_format.describe()))
    assert description == {
        "roles": {role: {"prefix": markers.prefix, "suffix": markers.suffix}
                  for role, markers in smollm2_format.roles.items()},
        "generation_prefix": "<|im_start|>assistant\n",
        "default_system": SMOLLM2_SYSTEM,
        "stop_token": "<|im_end|>",
        "stop_sequences": ["<|im_end|>", "<|endoftext|>"],
    }
    rebuilt = ChatFormat(roles={role: RoleMarkers(**markers) for role, markers in description["roles"].items()},
                         generation_prefix=description["generation_prefix"],
                         default_system=description["default_system"], stop_token=description["stop_token"],
                         stop_sequences=tuple(description["stop_sequences"]))
    assert rebuilt == smollm2_format
    # A client that has only the description writes what the template writes.
    conversation = CONVERSATIONS[2]
    written = "".join(description["roles"][message["role"]]["prefix"] + message["content"]
                      + description["roles"][message["role"]]["suffix"] for message in conversation)
    written += description["generation_prefix"]
    assert written == smollm2.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def test_an_unknown_role_is_refused(smollm2_format):
    for chat_format in (smollm2_format, ChatFormat.declared(DECLARED_CHAT, "</s>", ("</s>",))):
        with pytest.raises(InvalidRequest, match="Unknown message role 'tool'") as caught:
            chat_format.render([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}])
        assert caught.value.param == "messages"


def test_the_module_loads_without_torch_or_petals():
    code = ("import sys; import sessions.formats.chat_format; "
            "print(sorted(name for name in ('torch', 'petals', 'transformers') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
