"""The chat page in a real headless Chromium against the real server on the local swarm."""

import dataclasses
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from config import ManagerSettings
from server import make_app
from sessions.chat_format import ChatFormat
from sessions.manager import build_manager
from tests.browser import MID_REPLY_SCREENSHOT, PHONE_SCREENSHOT, PHONE_SIZE, REPLY_LENGTH_RECORDER, ChatPage, \
    ChatServer, drive, start_chromium

VENDOR_DIR = Path(__file__).resolve().parent.parent / "static" / "vendor"
DEFAULT_NAME = "SmolLM2 135M Instruct"
DEFAULT_REPOSITORY = "HuggingFaceTB/SmolLM2-135M-Instruct"
# With greedy decoding the default model answers this with an HTML code block holding a <script> tag.
SCRIPT_QUESTION = "Write the HTML tag that loads the script file app.js. Reply with the tag only."


def test_the_vendored_libraries_are_the_pinned_versions():
    pins = dict(re.findall(r"^(\w+)_VERSION=(\S+)$", (VENDOR_DIR / "refresh.sh").read_text(), re.MULTILINE))
    # Each pin of refresh.sh: the browser build, how its header names the version, its license.
    vendored = {"MARKDOWN_IT": ("markdown-it.min.js", "/*! markdown-it {} ", "markdown-it.LICENSE"),
                "DOMPURIFY": ("purify.min.js", "/*! @license DOMPurify {} ", "dompurify.LICENSE"),
                "HIGHLIGHT_JS": ("highlight.min.js", "Highlight.js v{} ", "highlight.js.LICENSE")}
    assert set(pins) == set(vendored)
    for name, (build, header, license_file) in vendored.items():
        assert header.format(pins[name]) in (VENDOR_DIR / build).read_text()[:200], build
        assert (VENDOR_DIR / license_file).is_file()


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module's tests (each test gets a fresh origin and storage)."""
    browser = start_chromium()
    yield browser
    browser.quit()


@pytest.fixture
def chat_server(app, io_loop):
    """The app on a loopback port of its own."""
    server = ChatServer(app, io_loop)
    server.start()
    yield server
    server.server.stop()
    io_loop.run_sync(server.server.close_all_connections)


@pytest.fixture
def page(chromium, chat_server):
    return ChatPage(chromium, chat_server.url)


@pytest.fixture
def expiring_server(io_loop, tiny_model_specs, settings):
    """The app serving Tiny Llama from a manager whose sessions expire after a second idle."""
    manager = build_manager(tiny_model_specs[:1], settings.initial_peers, settings.device, settings.torch_dtype,
                            executor_workers=2, settings=ManagerSettings(idle_timeout=1.0))
    io_loop.run_sync(manager.start)
    server = ChatServer(make_app(settings, manager), io_loop)
    server.start()
    yield server
    server.server.stop()
    io_loop.run_sync(server.server.close_all_connections)
    io_loop.run_sync(manager.close)


async def test_streams_a_reply_token_by_token_and_stops_at_once(page, tmp_path):
    def steps():
        page.open()
        groups = page.chromium.execute_script(
            "return [...document.querySelectorAll('#model optgroup')].map((group) =>"
            " [group.label, [...group.children].map((option) => option.text)])")
        assert groups == [["Tiny", ["Tiny Llama", "Tiny BLOOM"]], ["SmolLM2", [DEFAULT_NAME]]]
        assert page.model_name() == "Tiny Llama"
        assert page.messages() == [{"role": "assistant", "text": "Hi! How can I help you today?"}]

        page.send("first line", "second line")
        page.wait_for_reply_updates(10)
        assert "tokens/s" in page.element("speed").text
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        stopped_reply = page.last_reply()
        time.sleep(0.5)
        assert page.last_reply() == stopped_reply, "the reply grew after it was stopped"

        lengths = [length for length in page.reply_lengths() if length]
        assert lengths == sorted(lengths), "the reply must only grow while it streams"
        assert len(set(lengths)) >= 10
        user_messages = [message["text"] for message in page.messages() if message["role"] == "user"]
        assert user_messages == ["first line\nsecond line"]
        (opened,) = page.sent("open_inference_session")
        assert opened == {"type": "open_inference_session", "model": "tests/tiny-llama", "max_length": 512}
        (first,) = page.sent("generate")
        assert first["max_new_tokens"] == 1 and first["stop_sequence"] == "<|im_end|>"
        assert first["inputs"].endswith("<|im_start|>user\nfirst line\nsecond line<|im_end|>\n<|im_start|>assistant\n")
        assert page.sent("stop") == [{"type": "stop"}]
        streamed = [reply for reply in page.received() if "outputs" in reply]
        assert all(reply["token_count"] <= 1 for reply in streamed) and streamed[-1]["stop"] is True

        # The next turn goes to the same session with only the new text.
        page.send("next question")
        page.wait_for_reply_updates(3)
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        assert len(page.sent("open_inference_session")) == 1
        # The stopped reply did not end with the stop token: its whole suffix comes first.
        assert page.sent("generate")[-1]["inputs"] == \
            "<|im_end|>\n<|im_start|>user\nnext question<|im_end|>\n<|im_start|>assistant\n"
        assert page.chromium.find_elements(By.CSS_SELECTOR, ".message:last-child .regenerate")

    await drive(page, tmp_path, steps)


async def test_each_model_keeps_its_conversation_across_switches_and_reloads(page, tmp_path):
    def chat_briefly(text):
        page.send(text)
        page.wait_for_reply_updates(3)
        page.element("stop").click()
        page.wait_until_idle(timeout=5)

    def user_texts():
        return [message["text"] for message in page.messages() if message["role"] == "user"]

    def steps():
        page.open()
        chat_briefly("hello llama")
        page.choose_model("Tiny BLOOM")
        assert user_texts() == []
        page.set_temperature(1)  # greedy, this random model only writes newlines
        page.send("hello bloom")
        page.wait_for_reply_updates(3)
        assert [message["model"] for message in page.sent("open_inference_session")] == [
            "tests/tiny-llama", "tests/tiny-bloom"]
        page.element("new-chat").click()  # in the middle of the reply
        page.wait_until_idle(timeout=5)
        assert len(page.messages()) == 1

        page.choose_model("Tiny Llama")
        assert user_texts() == ["hello llama"]
        page.reload()
        assert page.model_name() == "Tiny Llama"
        assert user_texts() == ["hello llama"] and len(page.messages()) == 3

        page.chromium.find_element(By.CSS_SELECTOR, ".settings summary").click()
        page.element("clear-saved").click()
        page.reload()
        assert user_texts() == []

    await drive(page, tmp_path, steps)


async def test_model_output_with_a_script_tag_shows_as_text_in_a_code_block(page, tmp_path):
    def steps():
        page.open()
        page.choose_model(DEFAULT_NAME)
        assert page.element("model-card").get_attribute("href") == \
            "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
        assert page.element("model-license").get_attribute("href") == "https://www.apache.org/licenses/LICENSE-2.0"
        page.set_temperature(0)
        page.send(SCRIPT_QUESTION)
        page.wait(lambda: "<script" in page.last_reply(), message="no code in the reply")
        page.screenshot(MID_REPLY_SCREENSHOT, tmp_path / "mid-reply.png")
        assert page.generating(), "the mid-reply screenshot came too late"
        page.wait_until_idle()

        reply = page.last_reply()
        assert "<script" in reply
        code = page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child figure.code code")
        assert code.text.startswith("<script")
        assert code.value_of_css_property("font-family").startswith("ui-monospace")
        assert page.chromium.execute_script("return document.querySelectorAll('#conversation script').length") == 0
        (generate,) = page.sent("generate")
        assert generate["do_sample"] == 0 and generate["extra_stop_sequences"] == ["<|endoftext|>"]

        page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child .copy").click()
        page.wait(lambda: page.clipboard_text() == code.text, timeout=5, message="the code was not copied")

        # Regenerating replays the conversation without the last reply in a new session.
        page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child .regenerate").click()
        page.wait_until_idle()
        assert [message["role"] for message in page.messages()] == ["assistant", "user", "assistant"]
        assert page.last_reply() == reply
        first, second = page.sent("generate")
        assert second["inputs"] == first["inputs"] and len(page.sent("open_inference_session")) == 2

        page.reload()
        assert page.last_reply() == reply
        page.chromium.set_window_size(*PHONE_SIZE)
        page.screenshot(PHONE_SCREENSHOT, tmp_path / "phone.png")
        assert page.chromium.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"), "the page is wider than a phone"

    await drive(page, tmp_path, steps)


async def test_the_page_writes_the_conversation_as_the_server_formats_it(page, manager, tmp_path):
    loaded = manager.registry.find(DEFAULT_REPOSITORY)
    chat_format = ChatFormat.for_model(loaded.tokenizer, loaded.spec.chat, loaded.stop_token)
    stop_token = chat_format.stop_token
    questions = ["What is the capital of France? Answer in one sentence.", "And the capital of Italy?"]

    def steps():
        page.open()
        page.choose_model(DEFAULT_NAME)
        page.set_temperature(0)
        for count, question in enumerate(questions, start=1):
            page.send(question)
            page.wait(lambda: sum(bool(reply.get("stop")) for reply in page.received()) == count,
                      message=f"reply {count} never ended")
            page.wait_until_idle()
        assert page.error_text() == ""
        system_text, greeting = page.chromium.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "import(new URL('js/prompt.js', document.baseURI).href)"
            ".then((prompt) => done([prompt.SYSTEM_TEXT, prompt.GREETING]));")

        # One session; each generate's replies arrive before the next generate is sent.
        assert len(page.sent("open_inference_session")) == 1
        generates = page.sent("generate")
        assert len(generates) == 2 and all(generate["visible_text"] is True for generate in generates)
        replies, current = [], []
        for reply in page.received():
            if "outputs" in reply:
                current.append(reply)
                if reply["stop"]:
                    replies.append(current)
                    current = []
        assert len(replies) == 2 and current == []
        raw_reply = "".join(reply["outputs"] for reply in replies[0])
        assert raw_reply.endswith(stop_token), "the first reply must end with the stop token"
        wire = generates[0]["inputs"] + raw_reply + generates[1]["inputs"]

        messages = [{"role": "system", "content": system_text}, {"role": "assistant", "content": greeting},
                    {"role": "user", "content": questions[0]},
                    {"role": "assistant", "content": raw_reply[:-len(stop_token)]},
                    {"role": "user", "content": questions[1]}]
        assert wire == chat_format.render(messages, add_generation_prompt=True)

        # /v1/chat/completions writes the same conversation the same way: the same prompt tokens,
        # and the same greedy reply as the page's second one.
        second_reply = "".join(reply["outputs"] for reply in replies[1])
        request = urllib.request.Request(page.url + "v1/chat/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": DEFAULT_REPOSITORY, "messages": messages,
                                                          "temperature": 0, "max_tokens": 300}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            completion = json.load(response)
        assert completion["usage"]["prompt_tokens"] == len(loaded.encode(wire))
        assert completion["choices"][0]["message"]["content"] == second_reply.removesuffix(stop_token)

        # The page shows the server's visible text: each reply without its stop token.
        shown = [message["text"] for message in page.messages() if message["role"] == "assistant"]
        assert shown[0] == greeting
        assert shown[1:] == ["".join(reply["text"] for reply in group).strip() for group in replies]
        assert shown[1] and stop_token not in shown[1] and stop_token not in shown[2]

    await drive(page, tmp_path, steps)


async def test_a_too_long_conversation_is_replayed_in_a_longer_session(page, tmp_path):
    # About 560 tokens with the system text and the greeting: just over the first session's 512.
    long_text = "Summarize this:" + " The quick brown fox jumps over the lazy dog." * 50

    def steps():
        page.open()
        page.choose_model(DEFAULT_NAME)
        page.send(long_text)
        page.wait_for_reply_updates(3)
        page.element("stop").click()
        page.wait_until_idle(timeout=10)
        assert page.error_text() == ""
        assert [message["max_length"] for message in page.sent("open_inference_session")] == [512, 2048]
        first, replay = page.sent("generate")
        assert first["inputs"] == replay["inputs"] and long_text in replay["inputs"]
        assert any(reply.get("code") == "max_length_exceeded" for reply in page.received())

    await drive(page, tmp_path, steps)


async def test_lost_connections_are_retried_and_an_outage_shows_an_error_with_retry(page, chat_server, tmp_path):
    def steps():
        page.open()
        page.send("hello")
        page.wait_for_reply_updates(5)
        # The server drops the connection mid-reply: the page reconnects once by itself.
        chat_server.on_loop(chat_server.drop_websockets)
        page.wait(lambda: len(page.sent("generate")) == 2, timeout=10, message="no automatic retry")
        page.reset_reply_lengths()
        page.wait_for_reply_updates(3)
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        assert page.error_text() == ""

        chat_server.on_loop(chat_server.stop)
        sockets_before = page.socket_count()
        page.send("are you there?")
        page.wait(lambda: page.error_text(), timeout=15, message="no error shown")
        assert "Lost the connection" in page.error_text()
        assert page.socket_count() == sockets_before + 2, "expected one attempt and one automatic retry"
        assert page.element("retry").is_displayed()

        chat_server.on_loop(chat_server.start)
        page.reset_reply_lengths()
        page.element("retry").click()
        page.wait_for_reply_updates(3)
        assert page.error_text() == ""
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        replay = page.sent("generate")[-1]["inputs"]
        assert "user\nhello" in replay and replay.endswith("user\nare you there?<|im_end|>\n<|im_start|>assistant\n")

    await drive(page, tmp_path, steps)


async def test_an_expired_session_is_reopened_and_the_conversation_replayed(chromium, expiring_server, tmp_path):
    page = ChatPage(chromium, expiring_server.url)

    def steps():
        page.open()
        page.send("hello")
        page.wait_for_reply_updates(3)
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        time.sleep(2.5)  # idle past the timeout: the server closes the session

        page.send("still there?")
        page.wait(lambda: len(page.sent("open_inference_session")) == 2, timeout=10, message="no new session")
        page.wait_for_reply_updates(3)
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        assert page.error_text() == ""
        assert any(reply.get("code") == "session_expired" for reply in page.received())
        replay = page.sent("generate")[-1]["inputs"]
        assert "user\nhello" in replay and replay.endswith("user\nstill there?<|im_end|>\n<|im_start|>assistant\n")

    await drive(page, tmp_path, steps)


async def test_the_page_asks_once_for_the_api_key_and_uses_it(chromium, settings, manager, io_loop, tmp_path):
    server = ChatServer(make_app(dataclasses.replace(settings, api_key="page-key"), manager), io_loop)
    server.start()
    page = ChatPage(chromium, server.url)

    def enter_key(key: str) -> None:
        page.wait(lambda: page.element("api-key-dialog").is_displayed(), message="the page asks for the key")
        page.element("api-key").send_keys(key, Keys.ENTER)

    def steps():
        chromium.get(server.url)
        chromium.execute_script("localStorage.clear()")
        chromium.get(server.url)
        chromium.execute_script(REPLY_LENGTH_RECORDER)
        enter_key("guess")
        page.wait(lambda: page.element("api-key-refused").is_displayed(), message="the refusal is shown")
        enter_key("page-key")
        page.wait(lambda: page.element("model").is_enabled() and page.model_name(), message="models listed")
        assert not page.element("api-key-dialog").is_displayed()
        page.send("hello")
        page.wait_for_reply_updates(3)  # streamed over a WebSocket that carried the key
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        assert page.error_text() == ""

        chromium.get(server.url)  # asked once: the key is kept
        page.wait(lambda: page.element("model").is_enabled() and page.model_name(), message="models listed")
        assert not page.element("api-key-dialog").is_displayed()

    try:
        await drive(page, tmp_path, steps)
    finally:
        await server.stop()


async def test_swarm_map_page_shows_every_model_with_a_full_route(chromium, chat_server, manager, tmp_path):
    page = ChatPage(chromium, chat_server.url)

    def steps():
        chromium.get(chat_server.url + "swarm")
        assert chromium.current_url.endswith("/swarm.html")
        page.wait(lambda: len(chromium.find_elements(By.CSS_SELECTOR, "section.model")) == len(manager.registry.models),
                  message="the swarm map lists every model")
        sections = chromium.find_elements(By.CSS_SELECTOR, "section.model")
        for section, loaded in zip(sections, manager.registry.models):
            assert section.find_element(By.CSS_SELECTOR, ".name").text == loaded.spec.key
            assert section.find_element(By.CSS_SELECTOR, ".badge").text == "full route"
            cells = section.find_elements(By.CSS_SELECTOR, ".block")
            assert [cell.get_attribute("data-servers") for cell in cells] == ["1"] * loaded.num_blocks
            [row] = section.find_elements(By.CSS_SELECTOR, "tbody tr")
            assert row.find_elements(By.TAG_NAME, "td")[1].text == f"0–{loaded.num_blocks - 1}"
        assert "Every model can run." in page.element("status").text
        page.screenshot(tmp_path / "swarm-map.png")

    await drive(page, tmp_path, steps)
