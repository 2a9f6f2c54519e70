"""The chat page at / in a real headless Chromium (Selenium), against a real server at 1 rank.

The page is plain JavaScript that nothing else runs, so only a browser can tell whether it works: it types a
message as a user does and reads the streamed answer out of the page. The tiny random model's text is noise,
but deterministic at temperature 0, so the page's answer must be exactly what the openai client gets for the
same request. Needs Debian's `chromium` and `chromium-driver` packages (CI installs them) and selenium."""

from __future__ import annotations

import shutil
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from test_server import CONTEXT, KEY, NAME, Server, start_server, thinking_template

SYSTEM = "You answer in one short sentence."
MAX_TOKENS = 12
WAIT_S = 120  # an upper bound for an answer to finish, not an expectation


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium through the system's chromedriver: Selenium Manager never runs (it would download a
    driver and a browser, and CI has no internet)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the chat page's tests need Chromium and its driver: "
                    "apt-get install -y --no-install-recommends chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(text_model: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(text_model(), tmp_path_factory.mktemp("chat-page") / "stderr.log", ranks=1)
    yield s
    s.stop()


def open_page(browser: WebDriver, server: Server, key: str = KEY, temperature: str = "0",
              max_tokens: int = MAX_TOKENS) -> None:
    """Load the page and fill its settings as a user would."""
    browser.get(server.url + "/")
    for field, value in (("system", SYSTEM), ("temperature", temperature), ("max-tokens", str(max_tokens)),
                         ("api-key", key)):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "input").click()  # as a user goes on to type: the key field's change is stored


def assistants(browser: WebDriver) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, "#messages .assistant")


def send(browser: WebDriver, *keys: str) -> WebElement:
    """Type a message (Keys.ENTER sends it) and return its answer's element once the answer has ended."""
    n = len(assistants(browser)) + 1
    browser.find_element(By.ID, "input").send_keys(*keys)
    return wait_ended(browser, n)


def wait_ended(browser: WebDriver, n: int) -> WebElement:
    """The n-th answer's element, once it is no longer streaming (done, stopped or failed)."""
    def ended(d: WebDriver) -> WebElement | bool:
        found = assistants(d)
        return len(found) >= n and found[n - 1].get_attribute("data-state") != "streaming" and found[n - 1]

    answer = WebDriverWait(browser, WAIT_S).until(ended)
    assert isinstance(answer, WebElement)
    return answer


def started(browser: WebDriver) -> None:
    """Wait until the first answer has some text. Polled often: the long answer that Stop or SIGTERM is to
    interrupt takes a second or two to finish, and WebDriverWait's default poll takes half a second."""
    WebDriverWait(browser, WAIT_S, poll_frequency=0.02).until(
        lambda d: assistants(d) and text(assistants(d)[0], ".content"))


def text(answer: WebElement, part: str) -> str:
    """The exact text of an answer's part (.content, .thinking or .error): textContent, not the rendered text,
    which drops hidden elements and folds whitespace."""
    return answer.find_element(By.CSS_SELECTOR, part).get_property("textContent")


def reference(server: Server, messages: list[dict[str, Any]], max_tokens: int = MAX_TOKENS) -> Any:
    """The same request through the openai client, not streamed."""
    return server.client().chat.completions.create(model=NAME, messages=messages, temperature=0,
                                                   max_tokens=max_tokens).choices[0].message


def test_page_is_served_and_self_contained(browser: WebDriver, server: Server) -> None:
    """/ and /index.html give the page without a key, and it loads nothing from anywhere else."""
    pages = []
    for path in ("/", "/index.html"):
        with urllib.request.urlopen(server.url + path) as r:
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            pages.append(r.read())
    assert pages[0] == pages[1] and b"<script>" in pages[0]
    open_page(browser, server)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "model").text == NAME)
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(server.url + "/") for url in loaded), loaded


def test_streamed_answer_and_history(browser: WebDriver, server: Server) -> None:
    """Two turns typed into the page: each answer is what the API gives for the whole conversation so far
    (system prompt, first turn and its answer, second turn). The second message has a line that Shift+Enter
    broke rather than sent."""
    open_page(browser, server)
    first = send(browser, "Why is the sky blue?", Keys.ENTER)
    assert first.get_attribute("data-state") == "done", text(first, ".error")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why is the sky blue?"}]
    expected = reference(server, messages)
    assert expected.content and text(first, ".content") == expected.content
    assert text(first, ".thinking") == (expected.reasoning_content or "")

    box = browser.find_element(By.ID, "input")
    box.send_keys("And at sunset?")
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    second = send(browser, "Answer briefly.", Keys.ENTER)
    assert second.get_attribute("data-state") == "done", text(second, ".error")
    messages += [{"role": "assistant", "content": expected.content},
                 {"role": "user", "content": "And at sunset?\nAnswer briefly."}]
    assert text(second, ".content") == reference(server, messages).content
    users = browser.find_elements(By.CSS_SELECTOR, "#messages .user")
    assert [u.get_property("textContent") for u in users] == ["Why is the sky blue?", "And at sunset?\nAnswer briefly."]
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()


def test_the_key_is_kept(browser: WebDriver, server: Server) -> None:
    """The API key survives a reload (localStorage), so a user types it once."""
    open_page(browser, server)
    browser.refresh()
    assert browser.find_element(By.ID, "api-key").get_property("value") == KEY


def test_a_wrong_key_shows_the_servers_error(browser: WebDriver, server: Server) -> None:
    open_page(browser, server, key="sk-wrong")
    answer = send(browser, "Hello?", Keys.ENTER)
    assert answer.get_attribute("data-state") == "error"
    assert "invalid or missing API key" in text(answer, ".error")
    assert answer.find_element(By.CSS_SELECTOR, ".error").is_displayed()


def test_stop(browser: WebDriver, server: Server) -> None:
    """Stop ends a long answer where it got to; it stays in the conversation, and the page takes the next message."""
    open_page(browser, server, max_tokens=CONTEXT - 64)
    browser.find_element(By.ID, "input").send_keys("Talk for a long time.", Keys.ENTER)
    started(browser)
    browser.find_element(By.ID, "stop").click()
    stopped = wait_ended(browser, 1)
    assert stopped.get_attribute("data-state") == "stopped"
    assert text(stopped, ".content")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("2")
    assert send(browser, "Thanks.", Keys.ENTER).get_attribute("data-state") == "done"


def test_thinking_is_shown_apart(browser: WebDriver, text_model: Callable[..., str], tmp_path: Path) -> None:
    """With a template that opens <think>, the random model's whole answer is thinking: the page shows it in
    the thinking block, not as the answer."""
    s = start_server(text_model(thinking_template()), tmp_path / "stderr.log", ranks=1)
    try:
        open_page(browser, s)
        answer = send(browser, "Think about it.", Keys.ENTER)
        assert answer.get_attribute("data-state") == "done", text(answer, ".error")
        expected = reference(s, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Think about it."}])
        assert expected.reasoning_content and text(answer, ".thinking") == expected.reasoning_content
        assert text(answer, ".content") == expected.content == ""
        assert answer.find_element(By.CSS_SELECTOR, ".reasoning").is_displayed()
    finally:
        assert s.stop() == 0


def test_an_error_mid_stream_shows(browser: WebDriver, server: Server) -> None:
    """A failure after the answer began comes as an error event in the stream (here: the server stopping);
    the page shows its message. Last: it stops the module's server."""
    open_page(browser, server, max_tokens=CONTEXT - 64)
    browser.find_element(By.ID, "input").send_keys("Talk for a long time.", Keys.ENTER)
    started(browser)
    server.proc.send_signal(signal.SIGTERM)
    answer = wait_ended(browser, 1)
    assert answer.get_attribute("data-state") == "error"
    assert "shutting down" in text(answer, ".error")
    # wait, not server.stop(): a second SIGTERM after serve() has put the default handler back kills the process
    assert server.proc.wait(timeout=60) == 0
