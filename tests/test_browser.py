"""The chat page in a real headless Chromium against the real server on the local swarm."""

import dataclasses
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from config import Settings
from server import make_app
from sessions.accounts.store import KeyLimits
from sessions.formats.chat_format import ChatFormat
from sessions.serving.manager import build_manager
from tests.browser import (
    DESKTOP_SIZE,
    FINISHED_BLOCK_RECORDER,
    PHONE_SIZE,
    REPLY_LENGTH_RECORDER,
    SCREENSHOT_DIR,
    ChatPage,
    ChatServer,
    drive,
    start_chromium,
)
from tests.conftest import FAMILY_MODEL_NAMES
from tests.helpers import add_keys, wait_for_no_sessions
from tests.ws_client import WSClient

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
def chromium(manager, io_loop):
    """One headless Chromium for the module's tests (each test gets a fresh origin and storage).

    The page's sessions are resumable: a dropped one waits 3 s here (the page resumes at once),
    and none outlives the module."""
    grace, manager.resumable.grace = manager.resumable.grace, 3.0
    browser = start_chromium()
    yield browser
    browser.quit()
    io_loop.run_sync(lambda: wait_for_no_sessions(manager, timeout=30))
    manager.resumable.grace = grace


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
                            settings=Settings(executor_workers=2, idle_timeout=1.0))
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
        assert groups == [["Tiny", ["Tiny Llama", "Tiny BLOOM"]], ["Families", list(FAMILY_MODEL_NAMES.values())],
                          ["SmolLM2", [DEFAULT_NAME]]]
        assert page.model_name() == "Tiny Llama"
        assert page.messages() == [{"role": "assistant", "text": "Hi! How can I help you today?"}]

        page.send("first line", "second line")
        page.wait_for_reply_updates(10)
        assert "tokens/s" in page.reply_speed()
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
        assert opened == {"type": "open_inference_session", "model": "tests/tiny-llama", "max_length": 512,
                          "resumable": True, "queue_updates": True}
        (first,) = page.sent("generate")
        assert first["max_new_tokens"] == 1 and first["stop_sequence"] == "<|im_end|>"
        assert first["inputs"].endswith("<|im_start|>user\nfirst line\nsecond line<|im_end|>\n<|im_start|>assistant\n")
        assert page.sent("stop") == [{"type": "stop"}]
        streamed = [reply for reply in page.received() if "outputs" in reply]
        assert all(reply["token_count"] <= 1 for reply in streamed) and streamed[-1]["stop"] is True
        # Under the reply, the route its tokens took: the one server of the test swarm, all 4 blocks.
        (ribbon,) = page.chromium.find_elements(By.CSS_SELECTOR, ".message:last-child .route-span")
        assert re.fullmatch(r"…\w{6} 0–4 · \d+ ms", ribbon.text), ribbon.text
        assert ribbon.get_attribute("title").startswith(streamed[-1]["route"]["spans"][0]["peer_id"])

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

        page.toggle_menu("settings")
        page.element("clear-saved").click()
        page.reload()
        assert user_texts() == []

    await drive(page, tmp_path, steps)


async def test_a_reply_streams_as_markdown_block_by_block_with_highlighted_code_and_its_speed(page, tmp_path):
    def steps():
        page.open()
        page.choose_model(DEFAULT_NAME)
        assert page.element("model-card").get_attribute("href") == \
            "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
        assert page.element("model-license").get_attribute("href") == "https://www.apache.org/licenses/LICENSE-2.0"
        page.set_temperature(0)
        page.chromium.execute_script(FINISHED_BLOCK_RECORDER)
        page.send(SCRIPT_QUESTION)
        # The reply opens with a sentence, then the code block: the sentence's block is finished.
        page.wait(lambda: "<script" in page.chromium.execute_script(
            "return document.querySelector('#conversation .message:last-child .md-block .code code')?.textContent"
            " ?? ''"), message="no code in the reply")
        page.chromium.execute_script(
            "window.firstBlock = document.querySelector('#conversation .message:last-child .md-block')")
        for size_name, size in (("desktop", DESKTOP_SIZE), ("phone", PHONE_SIZE)):
            page.chromium.set_window_size(*size)
            for theme in ("light", "dark"):
                page.chromium.execute_script(
                    "const select = document.getElementById('theme');"
                    "select.value = arguments[0]; select.dispatchEvent(new Event('change'));", theme)
                page.screenshot(SCREENSHOT_DIR / f"mid-reply-{size_name}-{theme}.png", tmp_path / f"{size_name}-{theme}.png")
        page.chromium.set_window_size(*DESKTOP_SIZE)
        # Code is highlighted once its block is closed (not again for every token while it grows).
        page.wait(lambda: page.chromium.find_elements(By.CSS_SELECTOR, ".message:last-child .code .hljs-tag"),
                  message="the code block was not highlighted once closed")
        first_block_kept, still_streaming = page.chromium.execute_script(
            "return [window.firstBlock === document.querySelector('#conversation .message:last-child .md-block'),"
            " document.body.classList.contains('generating')]")
        assert still_streaming, "the mid-reply screenshots came too late"
        assert first_block_kept, "the finished first block was rendered again while the reply streamed"
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        assert page.chromium.execute_script("return window.finishedBlocksRemoved") == []

        reply = page.last_reply()
        assert "<script" in reply
        blocks = page.chromium.find_elements(By.CSS_SELECTOR, ".message:last-child .md-block > *")
        assert [block.tag_name for block in blocks][:2] == ["p", "figure"]
        code = page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child figure.code code")
        assert code.text.startswith("<script") and code.text.endswith("</script>")
        assert code.find_elements(By.CSS_SELECTOR, ".hljs-tag"), "the HTML code is not highlighted"
        assert code.value_of_css_property("font-family").startswith("ui-monospace")
        assert page.chromium.execute_script("return document.querySelectorAll('#conversation script').length") == 0
        (generate,) = page.sent("generate")
        assert generate["do_sample"] == 0 and generate["extra_stop_sequences"] == ["<|endoftext|>"]
        tokens = sum(message.get("token_count", 0) for message in page.received())
        speed = page.reply_speed()
        assert re.fullmatch(rf"first token after \d+\.\d\d s · {tokens} tokens · \d+\.\d tokens/s", speed), speed

        page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child .copy").click()
        page.wait(lambda: page.clipboard_text() == code.text, timeout=5, message="the code was not copied")

        page.reload()
        assert page.last_reply() == reply and page.reply_speed() == speed
        page.chromium.set_window_size(*PHONE_SIZE)
        assert page.chromium.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"), "the page is wider than a phone"

    await drive(page, tmp_path, steps)


# Model output that would run script if it became markup: each part sets window.pwned.
HOSTILE_REPLY = """Here is **bold**, *emphasis*, `code` and a [safe link](https://example.com/docs).

<img src=x onerror="window.pwned = 'img'"> <script>window.pwned = 'script'</script>
<!-- an HTML comment --> and [a script link](javascript:window.pwned='link')

| column | a long column with a long header that does not fit a phone |
|---|---|
| 1 | 2 |

```python
def add(a, b):
    return a + b  # a comment long enough to make this line wider than a phone's screen, which scrolls
```"""


def stored_tree(reply_versions, question="Two versions of a reply?"):
    """A conversation as the page saves it: one question with a reply in several versions, the last shown."""
    replies = [{"role": "assistant", "text": text, "children": [], "active": 0,
                "stats": {"firstTokenSeconds": 0.25, "tokens": 12, "tokensPerSecond": 7.5}} for text in reply_versions]
    return {"system": "Answer in French.", "active": 0,
            "children": [{"role": "user", "text": question, "children": replies, "active": len(replies) - 1}]}


async def test_a_saved_conversation_renders_markdown_safely_and_can_be_exported_imported_and_cleared(page, tmp_path):
    downloads = tmp_path / "downloads"

    def colours():
        return page.chromium.execute_script(
            "return getComputedStyle(document.body).backgroundColor")

    def steps():
        page.open()
        page.save_downloads_in(downloads)
        # Saved in the page's first format (a list of turns per model), which is still read.
        page.store({"model": "tests/tiny-llama", "conversations": {
            "tests/tiny-llama": [{"role": "user", "text": "<img src=x onerror=\"window.pwned = 'user'\">"},
                                 {"role": "assistant", "text": HOSTILE_REPLY}],
            "tests/tiny-bloom": stored_tree(["First version.", "Second version."])}})

        # Nothing the model wrote becomes markup (or runs: checked below, once an image's load
        # would have failed), and all of it is still shown as text.
        assert page.chromium.execute_script(
            "return document.querySelectorAll('#conversation img, #conversation script').length") == 0
        user, reply = page.messages()[1:]
        assert user["text"] == "<img src=x onerror=\"window.pwned = 'user'\">"
        for text in ("<img src=x onerror=", "<script>window.pwned = 'script'</script>", "<!-- an HTML comment -->",
                     "[a script link](javascript:window.pwned='link')"):
            assert text in reply["text"]
        links = page.chromium.execute_script("""
            return [...document.querySelectorAll("#conversation .message:last-child a")].map((link) =>
              [link.getAttribute("href"), link.target, link.rel]);""")
        assert links == [["https://example.com/docs", "_blank", "noopener noreferrer"]]
        # Markdown: emphasis, inline code, a table, highlighted code with its Copy button.
        last = page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child .body")
        assert [element.text for element in last.find_elements(By.CSS_SELECTOR, "strong, em, p > code")] == \
            ["bold", "emphasis", "code"]
        assert last.find_elements(By.CSS_SELECTOR, "table th")[1].text.startswith("a long column")
        assert last.find_element(By.CSS_SELECTOR, ".code .hljs-keyword").text == "def"
        assert last.find_element(By.CSS_SELECTOR, ".code figcaption").text == "python\nCopy"
        # Read in the old format, saved again as a tree.
        saved = page.stored()
        assert saved["version"] == 2
        assert saved["conversations"]["tests/tiny-llama"]["children"][0]["children"][0]["text"] == HOSTILE_REPLY

        # Every control has a name for screen readers; the conversation is a live region.
        unnamed = page.chromium.execute_script("""
            return [...document.querySelectorAll("button, input, select, textarea, summary")].filter((control) =>
              !(control.labels?.length || control.getAttribute("aria-label") || control.textContent.trim())
            ).map((control) => control.outerHTML);""")
        assert unnamed == []
        log = page.element("conversation")
        assert (log.get_attribute("role"), log.get_attribute("aria-live")) == ("log", "polite")

        # Themes: the system's (dark here), then light, remembered across a reload, then dark.
        page.chromium.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                      {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        assert colours() == "rgb(21, 23, 27)"
        page.choose_theme("light")
        assert colours() == "rgb(246, 247, 249)"
        page.reload()
        assert colours() == "rgb(246, 247, 249)" and page.element("theme").get_attribute("value") == "light"
        page.choose_theme("dark")
        page.chromium.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        assert colours() == "rgb(21, 23, 27)"

        # A phone's width: wide tables and code scroll inside the reply; the Chat menu fits.
        page.chromium.set_window_size(*PHONE_SIZE)
        page.toggle_menu("chat")
        assert page.chromium.execute_script("""
            const panel = document.querySelector(".chat-menu .menu-panel").getBoundingClientRect();
            return document.documentElement.scrollWidth <= window.innerWidth && panel.left >= 0 &&
              panel.right <= window.innerWidth;"""), "the page or its Chat menu is wider than a phone"
        page.screenshot(SCREENSHOT_DIR / "saved-chat-phone-dark.png")
        page.toggle_menu("chat")
        page.chromium.set_window_size(*DESKTOP_SIZE)

        assert page.chromium.execute_script("return window.pwned") is None

        # Versions of a reply: the newest is shown, ‹ shows the one before; each keeps its speed.
        page.choose_model("Tiny BLOOM")
        assert page.versions() == ["", "2/2"] and page.last_reply() == "Second version."
        assert page.reply_speed() == "first token after 0.25 s · 12 tokens · 7.5 tokens/s"
        page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child .previous").click()
        assert page.versions() == ["", "1/2"] and page.last_reply() == "First version."
        assert not page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child .previous").is_enabled()

        # Export as JSON (every version) and as Markdown (the messages shown), clear, import again.
        page.toggle_menu("chat")
        page.element("export-json").click()
        exported = json.loads(page.downloaded(downloads, ".json"))
        expected = stored_tree(["First version.", "Second version."])
        expected["children"][0]["active"] = 0
        assert exported == {"format": "swarm-chat conversation", "version": 2, "model": "tests/tiny-bloom",
                            "conversation": expected}
        page.element("export-markdown").click()
        assert page.downloaded(downloads, ".md") == (
            "# Chat with Tiny BLOOM\n\n**System prompt:** Answer in French.\n\n"
            "## Tiny BLOOM\n\nHi! How can I help you today?\n\n## You\n\nTwo versions of a reply?\n\n"
            "## Tiny BLOOM\n\nFirst version.\n")
        page.element("clear-chat").click()
        assert len(page.messages()) == 1 and "tests/tiny-bloom" not in page.stored()["conversations"]
        assert page.element("system-prompt").get_attribute("value") == page.chromium.execute_script(
            "return document.getElementById('system-default').textContent")
        page.choose_model("Tiny Llama")
        # A file exported from another model's chat goes back to that model.
        page.element("import-file").send_keys(str(next(downloads.glob("*.json"))))
        page.wait(lambda: page.model_name() == "Tiny BLOOM", timeout=5, message="the import did not switch models")
        assert page.versions() == ["", "1/2"] and page.last_reply() == "First version."
        assert page.element("system-prompt").get_attribute("value") == "Answer in French."
        assert page.stored()["conversations"]["tests/tiny-bloom"] == expected
        page.element("import-file").send_keys(str(next(downloads.glob("*.md"))))
        page.wait(lambda: page.error_text(), timeout=5, message="no error for a file that is not JSON")
        assert "is not JSON" in page.error_text()

    await drive(page, tmp_path, steps)


async def test_questions_are_edited_and_replies_regenerated_into_versions_with_the_chosen_system_prompt(page, tmp_path):
    def reply_briefly():
        page.wait_for_reply_updates(2)
        page.element("stop").click()
        page.wait_until_idle(timeout=5)

    def press(selector):
        """Presses Enter on a control, as someone using the keyboard only does."""
        page.chromium.find_element(By.CSS_SELECTOR, selector).send_keys(Keys.ENTER)

    def steps():
        page.open()
        models = json.load(urllib.request.urlopen(page.url + "api/v1/models", timeout=10))["models"]
        template_default = models[0]["chat"]["format"]["default_system"]
        page.toggle_menu("chat")
        system_box = page.element("system-prompt")
        default = page.element("system-default").text
        assert system_box.get_attribute("value") == default and default.startswith("A conversation between")
        assert page.element("model-system-text").text == template_default and template_default
        press("#use-model-system")
        assert system_box.get_attribute("value") == template_default
        system_box.clear()
        system_box.send_keys("Be brief.")
        page.toggle_menu("chat")

        page.send("hello")
        reply_briefly()
        first_reply = page.last_reply()
        first = page.sent("generate")[0]["inputs"]
        assert first.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")

        # Regenerate: a second version of the reply, from the conversation replayed without the first.
        press(".message:last-child .regenerate")
        reply_briefly()
        assert page.versions() == ["", "2/2"]
        assert page.sent("generate")[-1]["inputs"] == first and len(page.sent("open_inference_session")) == 2
        press(".message:last-child .previous")
        assert page.versions() == ["", "1/2"] and page.last_reply() == first_reply

        # Edit the question: a second version of it, answered from the system text on.
        press(".message.user .edit")
        box = page.chromium.find_element(By.CSS_SELECTOR, ".message.user textarea")
        assert box.get_attribute("value") == "hello" and page.chromium.switch_to.active_element == box
        assert not page.chromium.find_element(By.CSS_SELECTOR, ".message.user .edit").is_displayed()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("good morning", Keys.ENTER)
        reply_briefly()
        assert page.versions() == ["2/2", ""]
        edited = page.sent("generate")[-1]["inputs"]
        assert edited.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "hello" not in edited
        assert edited.endswith("<|im_start|>user\ngood morning<|im_end|>\n<|im_start|>assistant\n")

        # The tree is kept: after a reload the first question still has its two replies.
        page.reload()
        assert page.versions() == ["2/2", ""] and page.messages()[1]["text"] == "good morning"
        press(".message.user .previous")
        assert page.versions() == ["1/2", "1/2"] and page.messages()[1]["text"] == "hello"
        assert page.last_reply() == first_reply
        # Going on from there replays that branch in a new session.
        sessions = len(page.sent("open_inference_session"))
        page.send("and then?")
        reply_briefly()
        assert len(page.sent("open_inference_session")) == sessions + 1
        replay = page.sent("generate")[-1]["inputs"]
        first_reply_text = page.stored()["conversations"]["tests/tiny-llama"]["children"][0]["children"][0]["text"]
        assert "user\nhello<|im_end|>" in replay and "good morning" not in replay
        assert f"<|im_start|>assistant\n{first_reply_text}<|im_end|>" in replay

    await drive(page, tmp_path, steps)


async def test_a_later_reply_is_regenerated_and_its_question_edited_in_the_same_session(page, tmp_path):
    def reply_briefly():
        page.wait_for_reply_updates(2)
        page.element("stop").click()
        page.wait_until_idle(timeout=5)

    def steps():
        page.open()
        page.send("hello")
        reply_briefly()
        page.send("and then?")
        reply_briefly()
        second = page.sent("generate")[-1]
        # Where the session stood after the first reply, as the server said.
        first_end = [reply["session_length"] for reply in page.received() if "session_length" in reply][0]

        page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child .regenerate").click()
        reply_briefly()
        regenerated = page.sent("generate")[-1]
        assert len(page.sent("open_inference_session")) == 1  # no new session, no replay
        assert regenerated["from_position"] == first_end and regenerated["inputs"] == second["inputs"]
        assert page.versions()[-1] == "2/2"

        page.chromium.find_elements(By.CSS_SELECTOR, ".message.user .edit")[-1].click()
        box = page.chromium.find_element(By.CSS_SELECTOR, ".message.user textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("and why?", Keys.ENTER)
        reply_briefly()
        edited = page.sent("generate")[-1]
        assert len(page.sent("open_inference_session")) == 1
        assert edited["from_position"] == first_end and "and why?" in edited["inputs"]
        assert "hello" not in edited["inputs"] and "and then?" not in edited["inputs"]
        assert page.error_text() == ""

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


@pytest.mark.parametrize("family", list(FAMILY_MODEL_NAMES))
async def test_each_family_chats_on_the_page_in_its_own_format(page, manager, tmp_path, family):
    loaded = manager.registry.find(f"tests/tiny-{family}")

    def steps():
        page.open()
        page.choose_model(FAMILY_MODEL_NAMES[family])
        page.send("Hello there")
        page.wait_for_reply_updates(5)
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        assert page.error_text() == ""
        (opened,) = page.sent("open_inference_session")
        assert opened["model"] == f"tests/tiny-{family}"
        (generate,) = page.sent("generate")
        # The page writes the turn in the format the server derives from this model's template.
        chat_format = loaded.chat_format
        user = chat_format.roles["user"]
        assert generate["inputs"].endswith(user.prefix + "Hello there" + user.suffix + chat_format.generation_prefix)
        assert any(reply.get("outputs") for reply in page.received())

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


async def test_a_dropped_connection_is_resumed_and_an_outage_shows_an_error_with_retry(page, chat_server, tmp_path):
    def steps():
        page.open()
        page.send("hello")
        page.wait_for_reply_updates(5)
        # The connection drops mid-reply: the page resumes the session, and the reply goes on.
        sockets_before = page.socket_count()
        chat_server.on_loop(chat_server.drop_websockets)
        page.wait(lambda: page.sent("resume_inference_session"), timeout=10, message="no resume")
        page.reset_reply_lengths()
        page.wait_for_reply_updates(3)
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        assert page.error_text() == ""
        assert page.socket_count() == sockets_before + 1
        assert len(page.sent("generate")) == 1 and len(page.sent("open_inference_session")) == 1  # no replay
        (resume,) = page.sent("resume_inference_session")
        seqs = [reply["seq"] for reply in page.received() if "seq" in reply]
        assert seqs == list(range(1, len(seqs) + 1)), "every reply exactly once, in order"
        assert resume["last_seq"] < seqs[-1]

        chat_server.on_loop(chat_server.stop)
        sockets_before = page.socket_count()
        page.send("are you there?")
        page.wait(lambda: page.error_text(), timeout=15, message="no error shown")
        assert "Lost the connection" in page.error_text()
        assert page.socket_count() == sockets_before + 2, "expected a resume and one automatic retry"
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


def reply_status(page: ChatPage) -> str:
    """The line under the reply being written on what it waits for ("" when hidden)."""
    status = page.chromium.find_element(By.CSS_SELECTOR, ".message:last-child .reply-status")
    return status.text if status.is_displayed() else ""


async def test_on_a_full_server_the_page_shows_its_place_in_line_until_its_session_opens(
        page, chat_server, manager, monkeypatch, tmp_path):
    await wait_for_no_sessions(manager, timeout=30)  # the earlier tests' sessions, resumable a while
    monkeypatch.setattr(manager.admission, "settings", dataclasses.replace(manager.admission.settings, max_sessions=1))
    holder = await WSClient.connect(chat_server.port)  # holds the one place
    opened = await holder.request({"type": "open_inference_session", "model": "tests/tiny-llama", "max_length": 32})
    assert opened["ok"] is True
    first_in_line = "Server full — waiting for a place in line: 1st"

    def steps():
        page.open()
        page.send("hello")
        page.wait(lambda: reply_status(page) == first_in_line, timeout=10, message="no place in line shown")
        assert {"ok": True, "queued": True, "position": 1} in page.received()
        assert page.sent("generate") == [], "a place in line was taken for the open's reply"

        # Stop gives the place up: the question stays, without a reply.
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        page.wait(lambda: manager.waiting_room.waiting == 0, timeout=5, message="the place was kept")
        assert page.error_text() == "" and page.messages()[-1]["role"] == "user"

        page.send("hello again")
        page.wait(lambda: reply_status(page) == first_in_line, timeout=10, message="no place in line shown")
        chat_server.on_loop(holder.close)
        page.wait_for_reply_updates(3, timeout=20)
        assert reply_status(page) == ""
        page.element("stop").click()
        page.wait_until_idle(timeout=5)
        assert page.error_text() == ""
        opens = page.sent("open_inference_session")
        assert len(opens) == 2 and all(message["queue_updates"] is True for message in opens)
        assert len(page.sent("generate")) == 1

    try:
        await drive(page, tmp_path, steps)
    finally:
        holder.close()


@pytest.fixture
def small_budget_server(serve_with, tmp_path):
    """The URL of the app with a key book whose one key may spend 5 tokens a day (less than any
    prompt of the page), and that key."""
    keys_db = tmp_path / "keys.db"
    secret = add_keys(keys_db, alice=KeyLimits(daily_tokens=5))["alice"]
    return f"http://127.0.0.1:{serve_with(keys_db=keys_db)}/", secret


async def test_a_spent_daily_budget_is_explained_and_not_retried(chromium, small_budget_server, tmp_path):
    url, secret = small_budget_server
    page = ChatPage(chromium, url)

    def steps():
        chromium.get(url)
        chromium.execute_script("localStorage.clear()")
        chromium.get(url)
        page.wait(lambda: page.element("api-key-dialog").is_displayed(), message="the page asks for the key")
        page.element("api-key").send_keys(secret, Keys.ENTER)
        page.wait(lambda: page.element("model").is_enabled() and page.model_name(), message="models listed")
        page.send("hello")
        page.wait(lambda: page.error_text(), timeout=10, message="no error shown")
        page.wait_until_idle(timeout=5)
        shown = re.fullmatch(r"Your daily token budget is used up; it renews at 00:00 UTC "
                             r"\(in about (?:(\d+) h )?(\d+) min\)\.", page.element("error-text").text)
        assert shown, page.error_text()
        (refusal,) = [reply for reply in page.received() if reply.get("code") == "quota_exceeded"]
        hours, minutes = int(shown[1] or 0), int(shown[2])
        assert 0 <= (hours * 60 + minutes) * 60 - refusal["retry_after"] < 60
        assert not page.element("retry").is_displayed()
        time.sleep(2)  # past the page's delay before a retry of its own
        assert len(page.sent("open_inference_session")) == 1 and len(page.sent("generate")) == 1
        assert page.messages()[-1]["role"] == "user"

    await drive(page, tmp_path, steps)


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
            # The families' models are split over two nodes, half of the blocks each.
            half = loaded.num_blocks // 2
            expected = ([f"0–{half - 1}", f"{half}–{loaded.num_blocks - 1}"] if loaded.spec.family == "Families"
                        else [f"0–{loaded.num_blocks - 1}"])
            rows = section.find_elements(By.CSS_SELECTOR, "tbody tr")
            assert sorted(row.find_elements(By.TAG_NAME, "td")[1].text for row in rows) == expected
        assert "Every model can run." in page.element("status").text
        page.screenshot(tmp_path / "swarm-map.png")

    await drive(page, tmp_path, steps)


# What OpenAI's JavaScript client sends with a request from a browser, besides the key and the type.
JS_CLIENT_HEADERS = {"x-stainless-os": "Linux", "x-stainless-lang": "js", "x-stainless-package-version": "4.104.0",
                     "x-stainless-runtime": "browser:chrome", "x-stainless-runtime-version": "139.0.0",
                     "x-stainless-arch": "unknown", "x-stainless-retry-count": "0", "x-stainless-timeout": "600",
                     "openai-organization": "org-test", "openai-project": "proj-test"}
CALL_FROM_PAGE = """
const [url, headers, body, done] = arguments;
fetch(url, {method: "POST", headers, body: JSON.stringify(body)})
  .then(async (response) => done({status: response.status, reply: await response.json()}),
        (error) => done({error: String(error)}));
"""


@pytest.fixture
def other_origin(io_loop):
    """The URL of an empty page served on another port: another origin than the chat server's."""

    class EmptyPage(tornado.web.RequestHandler):
        def get(self):
            self.write("<!doctype html><title>Another site</title>")

    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([("/", EmptyPage)]))
    server.add_socket(sock)
    yield f"http://127.0.0.1:{port}/"
    server.stop()
    io_loop.run_sync(server.close_all_connections)


async def test_a_page_on_another_origin_calls_the_openai_api_with_the_openai_clients_headers(
        chromium, chat_server, other_origin, tmp_path):
    page = ChatPage(chromium, other_origin)
    headers = {"Authorization": "Bearer unused", "Content-Type": "application/json", **JS_CLIENT_HEADERS}
    body = {"model": "tests/tiny-llama", "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}]}

    def steps():
        chromium.get(other_origin)
        answer = chromium.execute_async_script(CALL_FROM_PAGE, chat_server.url + "v1/chat/completions", headers, body)
        assert answer.get("status") == 200, answer  # the browser refused the call unless the preflight allowed it all
        assert answer["reply"]["object"] == "chat.completion" and answer["reply"]["usage"]["completion_tokens"] == 3

    await drive(page, tmp_path, steps)
