"""The web chat (`python -m serve.web`) in a real headless browser: Chromium from the system packages,
driven by Playwright's Python package. Upload an image, ask, read the streamed answer (equal to test.py's),
ask a follow-up (equal to the two-turn `vlm.chat`), and take a screenshot.

Set WEB_CHAT_SCREENSHOT=PATH to keep the screenshot (docs/web_chat.png was made that way)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from tests.tiny_serve import QUESTION, image, messages, stopping_vlm
from tests.tiny_server import ROOT, start_server

pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn (pip install .[serve])")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install .[dev])")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
FOLLOW_UP = "And the colour?"
MAX_TOKENS = 8


def _chromium() -> str:
    path = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; make setup does this where apt-get "
                    "is available)")
    return path


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    vlm = stopping_vlm(tmp)
    vlm.save_pretrained(tmp / "model")
    (tmp / "examples").mkdir()
    for i in range(3):
        image(i).save(tmp / "examples" / f"example_{i}.png")
    image(0).save(tmp / "q.png")
    server = start_server("serve.web", tmp / "model", "--examples", str(tmp / "examples"),
                          "--default-max-tokens", str(MAX_TOKENS), log_dir=tmp)
    yield vlm, server, tmp
    server.stop()


def _test_py_answer(args: list[str], capsys) -> str:
    spec = importlib.util.spec_from_file_location("entry_test", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    assert module.main(args) == 0
    return capsys.readouterr().out[:-1]  # the answer, without print's newline


def test_web_chat_in_a_real_browser(web, capsys):
    vlm, server, tmp = web
    expect = _test_py_answer(["--model", str(tmp / "model"), "--image", str(tmp / "q.png"), "--prompt", QUESTION,
                              "--max-new-tokens", str(MAX_TOKENS)], capsys)
    assert expect
    follow = vlm.chat([image(0)], messages() + [{"role": "assistant", "content": expect},
                                                {"role": "user", "content": FOLLOW_UP}], max_new_tokens=MAX_TOKENS)

    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        except sync_api.Error as e:
            pytest.skip(f"Chromium is installed but cannot start here: {str(e).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(server.url + "/")
            page.wait_for_selector("#examples img.example")
            assert page.locator("#examples img.example").count() == 3  # the --examples folder
            assert page.text_content("#model") == "model"

            page.set_input_files("#files", str(tmp / "q.png"))
            page.wait_for_selector("#pending img")
            page.fill("#prompt", QUESTION)
            page.click("#send")
            first = page.locator(".msg.assistant").nth(0)
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=120_000)
            assert first.locator(".error").count() == 0, first.text_content()
            assert first.locator(".text").text_content() == expect
            assert int(first.get_attribute("data-chunks")) >= 1  # it arrived as a stream of deltas
            assert page.locator(".msg.user img").count() == 1

            page.fill("#prompt", FOLLOW_UP)  # multi-turn: the page sends the whole conversation
            page.keyboard.press("Enter")
            page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='true']\").length == 2",
                                   timeout=120_000)
            second = page.locator(".msg.assistant").nth(1)
            assert second.locator(".text").text_content() == follow

            shot = tmp / "web_chat.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 1000
            if os.environ.get("WEB_CHAT_SCREENSHOT"):
                shutil.copy(shot, os.environ["WEB_CHAT_SCREENSHOT"])
        finally:
            browser.close()
    assert server.get("/health")["finished"] >= 2
