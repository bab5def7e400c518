"""Chat templates rendered by our own jinja2 environment, checked against a current transformers'
``apply_chat_template`` (in a process of its own), and the tool syntax found in each template."""

import itertools
import json
from datetime import datetime

import pytest
from transformers import AutoTokenizer

from model_specs import ChatSettings
from handlers.openai_protocol import ChatCompletionRequest
from sessions.formats.chat_format import ChatFormat
from sessions.formats.chat_template import ChatTemplate, ChatTemplateError
from sessions.formats.tool_syntax import HERMES, LLAMA_JSON
from tests.template_reference import FAMILY_TEMPLATES, family_template, reference_renderings

CHAT = ChatSettings(sep_token="\n", stop_token="<|im_end|>")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Das Wetter in einer Stadt <heute> & \"jetzt\"",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "Zürich, Genève, ..."},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}}}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich", "days": 2})}}
OTHER_CALL = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}
QUESTION = {"role": "user", "content": "Wie ist das Wetter in Zürich?"}
ROUND_TRIP = [{"role": "system", "content": "You answer briefly."}, QUESTION,
              {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"weather": "sunny, 21 °C"}'}]
CONVERSATIONS = {
    "question": [QUESTION],
    "developer-question": [{"role": "developer", "content": "  Be brief.  "}, QUESTION],
    "round-trip": ROUND_TRIP,
    "after-the-result": [*ROUND_TRIP, {"role": "assistant", "content": "Sonnig, 21 °C."},
                         {"role": "user", "content": [{"type": "text", "text": "Und in Bern?"}]}],
    "two-calls": [QUESTION, {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL, OTHER_CALL]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                  {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}],
    "thinking-history": [QUESTION, {"role": "assistant", "content": "<think>\nHmm.\n</think>\n\nSonnig."},
                         {"role": "user", "content": "Danke!"}],
}
# Where the template itself refuses the conversation (Llama 3.1's: one call per message).
REFUSED = {("llama3", "two-calls")}


def template_source(name: str, smollm2) -> str:
    return smollm2.chat_template if name == "smollm2" else family_template(name)


def request_parts(messages, tools):
    """The messages and tools as the chat API gives them to a template."""
    body = {"model": "m", "messages": messages, **({"tools": tools} if tools else {})}
    request = ChatCompletionRequest.parse(body)
    return request.template_messages(), request.template_tools()


CASES = [
    {"name": name, "conversation": conversation, "with_tools": with_tools, "add_generation_prompt": prompt,
     "thinking": thinking}
    for name, conversation, with_tools, (prompt, thinking) in itertools.product(
        ("smollm2", *FAMILY_TEMPLATES), CONVERSATIONS, (True, False), ((True, True), (True, False), (False, True)))]


@pytest.fixture(scope="module")
def smollm2(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def reference(smollm2, default_model_dir):
    """Every case rendered by transformers 4.57, in one process."""
    cases = []
    for case in CASES:
        messages, tools = request_parts(CONVERSATIONS[case["conversation"]], TOOLS if case["with_tools"] else None)
        cases.append({"template": template_source(case["name"], smollm2), "messages": messages, "tools": tools,
                      "add_generation_prompt": case["add_generation_prompt"],
                      "options": {} if case["thinking"] else {"enable_thinking": False}})
    return reference_renderings(default_model_dir, cases)


@pytest.mark.parametrize("name", ["smollm2", *FAMILY_TEMPLATES])
def test_our_rendering_is_transformers_own(smollm2, reference, name):
    template = ChatTemplate(template_source(name, smollm2), smollm2.special_tokens_map)
    compared = 0
    for case, expected in zip(CASES, reference):
        if case["name"] != name:
            continue
        messages, tools = request_parts(CONVERSATIONS[case["conversation"]], TOOLS if case["with_tools"] else None)
        label = (case["conversation"], case["with_tools"], case["add_generation_prompt"], case["thinking"])
        if "error" in expected:
            assert (name, case["conversation"]) in REFUSED, (label, expected["error"])
            with pytest.raises(ChatTemplateError, match="only supports single tool-calls"):
                template.render(messages, tools, case["add_generation_prompt"], case["thinking"])
        else:
            assert template.render(messages, tools, case["add_generation_prompt"], case["thinking"]) == \
                expected["text"], label
        compared += 1
    assert compared == len(CONVERSATIONS) * 6


def test_the_families_templates_show_tools_and_calls_as_their_models_expect(smollm2):
    def rendered(name: str, conversation: str) -> str:
        template = ChatTemplate(template_source(name, smollm2), smollm2.special_tokens_map)
        return template.render(*request_parts(CONVERSATIONS[conversation], TOOLS))

    llama = rendered("llama3", "round-trip")
    assert "Cutting Knowledge Date: December 2023" in llama and "Environment: ipython" in llama
    assert '"name": "get_weather"' in llama.split("<|start_header_id|>user<|end_header_id|>")[1]  # first user turn
    assert '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 2}}<|eot_id|>' in llama
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"weather": "sunny, 21 °C"}<|eot_id|>' in llama
    for name in ("qwen2", "qwen3"):
        qwen = rendered(name, "round-trip")
        assert "<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n" in qwen
        assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", '
                '"days": 2}}\n</tool_call><|im_end|>') in qwen
        assert '<|im_start|>user\n<tool_response>\n{"weather": "sunny, 21 °C"}\n</tool_response><|im_end|>' in qwen
    assert "You are Qwen, created by Alibaba Cloud." in rendered("qwen2", "question")
    # Qwen3 keeps no thinking of an answered question, and can be asked to skip thinking.
    qwen3 = ChatTemplate(family_template("qwen3"), smollm2.special_tokens_map)
    history = qwen3.render(*request_parts(CONVERSATIONS["thinking-history"], None))
    assert "Hmm." not in history and "<|im_start|>assistant\nSonnig.<|im_end|>" in history
    assert qwen3.render([QUESTION], thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen3.render([QUESTION]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name, syntax", [("llama3", LLAMA_JSON), ("qwen2", HERMES), ("qwen3", HERMES),
                                          ("smollm2", None)])
def test_the_tool_syntax_is_found_in_the_template(smollm2, name, syntax):
    assert ChatTemplate(template_source(name, smollm2), smollm2.special_tokens_map).tool_syntax == syntax


@pytest.mark.parametrize("source", [
    # Shows the tools, but writes calls in a syntax of its own.
    "{{ tools | tojson }}{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.tool_calls %}"
    "[TOOL_CALLS]{{ m.tool_calls | tojson }}{% endif %}\n{% endfor %}",
    # Writes calls as Qwen does, but never shows the tools to the model.
    "{% for m in messages %}{{ m.content }}{% for c in m.tool_calls or [] %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}"
    "\n</tool_call>{% endfor %}{% endfor %}",
    # Refuses a tool call.
    "{{ tools | tojson }}{% for m in messages %}{% if m.tool_calls %}{{ raise_exception('no calls') }}{% endif %}"
    "{{ m.content }}{% endfor %}",
], ids=["own-call-syntax", "tools-not-shown", "refuses-calls"])
def test_a_template_without_a_known_tool_syntax_has_none(source):
    assert ChatTemplate(source, {}).tool_syntax is None


def test_the_families_formats_render_plain_chats_as_the_reference_does(smollm2, default_model_dir):
    conversations = [[QUESTION], [{"role": "system", "content": "Be brief."}, QUESTION],
                     [QUESTION, {"role": "assistant", "content": "Sonnig."}, {"role": "user", "content": "Danke!"}]]
    derived = {name: ChatFormat.for_template(ChatTemplate(family_template(name), smollm2.special_tokens_map), CHAT,
                                             "<|im_end|>") for name in FAMILY_TEMPLATES}
    cases = [{"template": family_template(name), "messages": conversation, "tools": None, "add_generation_prompt": True,
              "options": {}} for name in ("llama3", "qwen2", "qwen3") for conversation in conversations]
    expected = iter(reference_renderings(default_model_dir, cases))
    for name in ("llama3", "qwen2", "qwen3"):
        for conversation in conversations:
            assert derived[name].render(conversation) == next(expected)["text"]
    assert derived["llama3"].roles["user"].prefix == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert derived["qwen2"].default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    # Qwen3's template thinks aloud before a reply after the last question, which role markers cannot
    # write: its format is exact for conversations that end with a question, which is what is sent.
    assert derived["qwen3"].roles["assistant"].prefix == "<|im_start|>assistant\n"


def test_the_environment_is_the_one_hub_templates_expect():
    source = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
              "{{ m | tojson }}|{{ m | tojson(indent=2) }}{% endfor %}\n   {% if true %}\n{{ strftime_now('%Y') }}"
              "{% endif %}")
    template = ChatTemplate(source, {"bos_token": "<s>"})
    text = template.render([{"role": "skip", "content": "x"}, {"role": "user", "content": "ä <b>"}])
    one = {"role": "user", "content": "ä <b>"}
    # Non-ASCII kept, HTML not escaped; blocks trimmed; loop controls; the date of today.
    assert text == f"<s>{json.dumps(one, ensure_ascii=False)}|{json.dumps(one, ensure_ascii=False, indent=2)}" \
                   f"{datetime.now().year}"


def test_a_template_that_does_not_compile_is_refused():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }}", {})


@pytest.mark.parametrize("source, problem", [
    ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
    ("{{ messages[0]['content'] + messages[1]['content'] }}", ""),  # None + str
    ("{{ messages.append(messages[0]) }}", "is unsafe"),  # the conversation is read-only
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "is unsafe"),  # no way out of the sandbox
])
def test_whatever_a_template_raises_is_a_chat_template_error(source, problem):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    with pytest.raises(ChatTemplateError, match="refused the conversation") as refused:
        ChatTemplate(source, {}).render(messages)
    assert problem in str(refused.value)
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]


def test_a_tokenizer_s_template(smollm2):
    assert ChatTemplate.for_tokenizer(smollm2).source == smollm2.chat_template
    original = smollm2.chat_template
    try:
        smollm2.chat_template = None
        assert ChatTemplate.for_tokenizer(smollm2) is None
        smollm2.chat_template = [{"name": "default", "template": original}]
        with pytest.raises(ChatTemplateError, match="several named chat templates"):
            ChatTemplate.for_tokenizer(smollm2)
    finally:
        smollm2.chat_template = original
