"""Helpers for the browser tests: headless Chromium from the system's packages, the chat page as a
test drives it, and a server the test can take offline and bring back.

Selenium calls block, while the server runs on the test's event loop: a test runs its browser
steps in a thread (``drive``) and the loop keeps serving.
"""

import asyncio
import json
import shutil
from pathlib import Path
from typing import Callable, List, Optional

import tornado.httpserver
import tornado.netutil
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

# Where the tests leave screenshots of the page for people to look at (mid-reply, themes, phone).
SCREENSHOT_DIR = Path("/tmp/swarm-chat-screenshots")
DESKTOP_SIZE = (1280, 900)
PHONE_SIZE = (390, 844)
WAIT_TIMEOUT = 60
POLL_SECONDS = 0.02

# Records what the page's WebSockets send and receive (the page's own traffic, unchanged), so
# that tests can check the protocol the page speaks.
WIRE_RECORDER = """
window.wire = {sockets: 0, sent: [], received: []};
const PageWebSocket = window.WebSocket;
window.WebSocket = class extends PageWebSocket {
  constructor(...args) {
    super(...args);
    window.wire.sockets += 1;
    this.addEventListener("message", (event) => window.wire.received.push(JSON.parse(event.data)));
  }
  send(data) {
    window.wire.sent.push(JSON.parse(data));
    super.send(data);
  }
};
"""

# Records the length of the last reply each time the page changes it.
REPLY_LENGTH_RECORDER = """
window.replyLengths = [];
const log = document.getElementById("conversation");
new MutationObserver(() => {
  const last = log.lastElementChild;
  if (last && last.matches(".message.assistant")) {
    window.replyLengths.push(last.querySelector(".body").textContent.length);
  }
}).observe(log, {subtree: true, childList: true, characterData: true});
"""

# Records every top-level Markdown block taken out of a reply while a block after it stayed, that
# is a finished block rendered again (a streaming reply may only replace its last block).
FINISHED_BLOCK_RECORDER = """
window.finishedBlocksRemoved = [];
new MutationObserver((records) => {
  for (const record of records) {
    for (const node of record.removedNodes) {
      if (node.classList && node.classList.contains("md-block") && record.nextSibling) {
        window.finishedBlocksRemoved.push(node.textContent);
      }
    }
  }
}).observe(document.getElementById("conversation"), {subtree: true, childList: true});
"""


def start_chromium() -> webdriver.Chrome:
    """Headless Chromium and its driver from the system's packages (`chromium`, `chromium-driver`)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError("chromium and chromedriver are required: `make test` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run",
                 "--disable-component-update", f"--window-size={DESKTOP_SIZE[0]},{DESKTOP_SIZE[1]}"):
        options.add_argument(flag)
    chromium = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chromium.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WIRE_RECORDER})
    return chromium


class ChatServer:
    """The application on a loopback port that stays the same when the server goes away and comes back."""

    def __init__(self, app, io_loop):
        self.app = app
        self.io_loop = io_loop
        self.port = 0
        self.server: Optional[tornado.httpserver.HTTPServer] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        """Listens (again) on the same port."""
        sockets = tornado.netutil.bind_sockets(self.port, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.server = tornado.httpserver.HTTPServer(self.app)
        self.server.add_sockets(sockets)

    def drop_websockets(self) -> None:
        """Closes every WebSocket connection as a restarting server would, and keeps serving."""
        for connection in list(self.app.settings["websockets"]):
            connection.close(1012, "Server restarting")

    async def stop(self) -> None:
        """Stops listening and closes every connection: the server is gone."""
        self.server.stop()
        self.drop_websockets()
        await self.server.close_all_connections()

    def on_loop(self, function: Callable, *args):
        """Runs ``function`` (a coroutine function or not) on the server's loop from a browser thread."""

        async def call():
            result = function(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(call(), self.io_loop.asyncio_loop).result(WAIT_TIMEOUT)


class ChatPage:
    """The chat page in Chromium, with the steps and reads the tests use."""

    def __init__(self, chromium: webdriver.Chrome, url: str):
        self.chromium = chromium
        self.url = url

    def open(self) -> None:
        """Loads the page with empty storage and waits until the models are listed."""
        self.chromium.set_window_size(*DESKTOP_SIZE)
        self.chromium.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": self.url.rstrip("/"), "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        self.chromium.get(self.url)
        self.chromium.execute_script("localStorage.clear()")
        self.reload()

    def reload(self) -> None:
        """Reloads the page and waits until it shows a model."""
        self.chromium.get(self.url)
        self.wait(lambda: self.element("model").is_enabled() and self.model_name())
        self.chromium.execute_script(REPLY_LENGTH_RECORDER)

    def element(self, element_id: str):
        return self.chromium.find_element(By.ID, element_id)

    def wait(self, condition: Callable[[], object], timeout: float = WAIT_TIMEOUT, message: str = ""):
        """Polls ``condition`` until it is truthy; returns its value."""
        return WebDriverWait(self.chromium, timeout, poll_frequency=POLL_SECONDS).until(
            lambda _: condition(), message or getattr(condition, "__name__", ""))

    def model_name(self) -> str:
        """The name of the model chosen in the picker."""
        return Select(self.element("model")).first_selected_option.text

    def choose_model(self, name: str) -> None:
        Select(self.element("model")).select_by_visible_text(name)

    def set_temperature(self, value: float) -> None:
        self.toggle_menu("settings")
        field = self.element("temperature")
        field.clear()
        field.send_keys(str(value))
        self.toggle_menu("settings")

    def toggle_menu(self, name: str) -> None:
        """Opens or closes the header menu ``name`` ("chat" or "settings")."""
        self.chromium.find_element(By.CSS_SELECTOR, f".{name}-menu summary").click()

    def choose_theme(self, theme: str) -> None:
        """Chooses "system", "light" or "dark" in Settings."""
        self.toggle_menu("settings")
        Select(self.element("theme")).select_by_value(theme)
        self.toggle_menu("settings")

    def store(self, saved: dict) -> None:
        """Replaces what the page keeps in local storage with ``saved`` and reloads the page."""
        self.chromium.execute_script("localStorage.setItem('swarm-chat', arguments[0])", json.dumps(saved))
        self.reload()

    def stored(self) -> dict:
        """What the page keeps in local storage."""
        return json.loads(self.chromium.execute_script("return localStorage.getItem('swarm-chat')") or "null")

    def send(self, *lines: str) -> None:
        """Types ``lines`` into the message box (Shift+Enter between them) and presses Enter."""
        self.reset_reply_lengths()
        box = self.element("prompt")
        for index, line in enumerate(lines):
            if index:
                box.send_keys(Keys.SHIFT, Keys.ENTER)
            box.send_keys(line)
        box.send_keys(Keys.ENTER)

    def generating(self) -> bool:
        return self.element("stop").is_displayed()

    def wait_until_idle(self, timeout: float = WAIT_TIMEOUT) -> None:
        self.wait(lambda: self.element("send").is_displayed(), timeout, "the reply never finished")

    def messages(self) -> List[dict]:
        """Every message shown, greeting included: role and text as rendered (a reply's Markdown
        without its marks)."""
        return self.chromium.execute_script("""
            return [...document.querySelectorAll("#conversation .message")].map((message) => ({
              role: message.classList.contains("user") ? "user" : "assistant",
              text: message.querySelector(".body").innerText,
            }));""")

    def last_reply(self) -> str:
        messages = self.messages()
        return messages[-1]["text"] if messages[-1]["role"] == "assistant" else ""

    def reset_reply_lengths(self) -> None:
        """Forgets the lengths recorded so far, before a new reply."""
        self.chromium.execute_script("window.replyLengths = []")

    def reply_lengths(self) -> List[int]:
        return self.chromium.execute_script("return window.replyLengths")

    def wait_for_reply_updates(self, count: int, timeout: float = WAIT_TIMEOUT) -> None:
        """Waits until the reply being streamed has had ``count`` different lengths."""
        self.wait(lambda: len(set(self.reply_lengths()) - {0}) >= count, timeout,
                  f"the reply did not grow {count} times")

    def sent(self, kind: str) -> List[dict]:
        """The messages of type ``kind`` the page sent over its WebSockets, in order."""
        return [message for message in self.chromium.execute_script("return window.wire.sent")
                if message["type"] == kind]

    def received(self) -> List[dict]:
        return self.chromium.execute_script("return window.wire.received")

    def socket_count(self) -> int:
        """How many WebSocket connections the page has tried to open since it loaded."""
        return self.chromium.execute_script("return window.wire.sockets")

    def error_text(self) -> str:
        box = self.element("error")
        return box.text if box.is_displayed() else ""

    def reply_speed(self) -> str:
        """The speed shown under the last reply."""
        return self.chromium.find_element(By.CSS_SELECTOR, ".message:last-child .reply-speed").text

    def versions(self) -> List[str]:
        """For each message shown after the greeting, its version ("1/2") or "" if it has one only."""
        return self.chromium.execute_script("""
            return [...document.querySelectorAll("#conversation .message")].slice(1).map((message) =>
              message.querySelector(".version")?.textContent ?? "");""")

    def screenshot(self, *paths: Path) -> None:
        png = self.chromium.get_screenshot_as_png()
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)

    def save_downloads_in(self, folder: Path) -> None:
        """Lets the page download files, into ``folder``."""
        self.chromium.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})

    def downloaded(self, folder: Path, suffix: str) -> str:
        """The text of the file ending with ``suffix`` that the page downloaded into ``folder``."""
        files = self.wait(lambda: [path for path in folder.glob(f"*{suffix}")], timeout=10,
                          message=f"no {suffix} file downloaded")
        return files[0].read_text()

    def clipboard_text(self) -> str:
        """The clipboard's text (``open`` lets the page's origin use the clipboard)."""
        return self.chromium.execute_async_script(
            "const done = arguments[0]; navigator.clipboard.readText().then(done, (e) => done('error: ' + e));")


async def drive(page: ChatPage, tmp_path: Path, steps: Callable[[], None]) -> None:
    """Runs the blocking browser ``steps`` in a thread while the server keeps serving; on a
    failure, saves a screenshot and the page's WebSocket traffic under ``tmp_path`` first."""

    def run():
        try:
            steps()
        except BaseException:
            page.screenshot(tmp_path / "failure.png")
            wire = page.chromium.execute_script("return window.wire")
            (tmp_path / "failure-wire.json").write_text(json.dumps(wire, indent=1))
            raise

    await asyncio.get_running_loop().run_in_executor(None, run)
