"""The web chat (`python -m qwenvl_lab.serve.web`, a Gradio page over the batching engine).

In a real headless browser (Chromium from the system packages, driven by Playwright's Python package):
upload an image, ask, read the streamed answer (equal to test.py's greedy answer), ask a follow-up (equal
to the two-turn `vlm.chat`), check the example images, and that neither the page nor the server process
reaches anything outside this machine (the server runs under `tests.offline_guard`). In-process: the
handler streams (one update per decoded token when the engine is held to one step per update),
a stopped answer cancels its job, and mistakes are one note in the chat and one log line before anything is
generated (a failed generation: one note; a bug: its traceback in the log). In the browser, a bad upload is one
note, no error overlay stays, and the next question is answered. Command-line mistakes (a missing model or
examples folder, a port in use, gradio missing) are one line, exit status 2.

Set WEB_CHAT_SCREENSHOT=PATH to keep the screenshot (docs/web_chat.png was made that way), and
WEB_CHAT_BAD_UPLOAD_SCREENSHOT=PATH for the page after the bad upload."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest

from tests.tiny_serve import QUESTION, image, messages, stopping_vlm
from tests.tiny_server import ROOT, answer_of_test_py, start_server

pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn (pip install .[serve])")
gr = pytest.importorskip("gradio", reason="the web chat needs gradio (pip install .[serve])")

from qwenvl_lab.serve.chat_page import NOT_ANSWERED, Conversation, make_respond  # noqa: E402
from qwenvl_lab.serve.engine import Engine  # noqa: E402  (after the skips: serve.chat_page imports gradio)
from qwenvl_lab.serve.protocol import Limits  # noqa: E402

from tests.offline_guard import MARK as OUTBOUND  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
FOLLOW_UP = "And the colour?"
MAX_TOKENS = 8
WAIT_MS = 120_000  # a loaded 2-core machine


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
    server = start_server("qwenvl_lab.serve.web", tmp / "model", "--examples", str(tmp / "examples"),
                          "--default-max-tokens", str(MAX_TOKENS), log_dir=tmp, offline_guard=True)
    yield vlm, server, tmp
    server.stop()


def _note_outside(url: str, origin: str, outside: list[str]) -> None:
    parts = urlsplit(url)  # data: and blob: URLs stay in the page
    if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc != origin:
        outside.append(url)


def _wait_status(page, n: int) -> None:
    page.wait_for_function(f"(document.querySelector('#status') || {{}}).innerText?.includes('answer {n}:')",
                           timeout=WAIT_MS)


@contextlib.contextmanager
def _chat_page(url: str, on_request=None):
    """(page, response) of the chat at `url` in headless Chromium, closed afterwards."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install .[dev])")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        except sync_api.Error as e:
            pytest.skip(f"Chromium is installed but cannot start here: {str(e).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            if on_request is not None:
                page.on("request", on_request)
            response = page.goto(url + "/")
            page.wait_for_selector("#prompt textarea", timeout=WAIT_MS)
            yield page, response
        finally:
            browser.close()


def test_web_chat_in_a_real_browser(web, capsys):
    vlm, server, tmp = web
    expect = answer_of_test_py(["--model", str(tmp / "model"), "--image", str(tmp / "q.png"), "--prompt", QUESTION,
                              "--max-new-tokens", str(MAX_TOKENS)], capsys)
    assert expect
    follow = vlm.chat([image(0)], messages() + [{"role": "assistant", "content": expect},
                                                {"role": "user", "content": FOLLOW_UP}], max_new_tokens=MAX_TOKENS)
    server_origin = urlsplit(server.url).netloc
    outside: list[str] = []

    with _chat_page(server.url, lambda r: _note_outside(r.url, server_origin, outside)) as (page, response):
        assert "connect-src 'self'" in response.headers["content-security-policy"]  # enforced by the browser
        assert "model" in page.text_content("#model-name")
        examples = page.locator("#examples .gallery-item")
        examples.first.wait_for(timeout=WAIT_MS)
        assert examples.count() == 3  # the --examples folder

        page.set_input_files("#prompt input[type=file]", str(tmp / "q.png"))
        page.wait_for_selector("#prompt .thumbnail-image", timeout=WAIT_MS)  # uploaded
        page.fill("#prompt textarea", QUESTION)
        page.keyboard.press("Enter")
        _wait_status(page, 1)
        bot = page.locator("#chat .message.bot .message-content")
        assert bot.count() == 1
        assert bot.nth(0).text_content() == expect
        assert page.locator("#chat .message.user img").count() == 1  # the image is shown in the user's turn
        assert page.locator("#prompt .thumbnail-image").count() == 0  # the input box was emptied

        page.fill("#prompt textarea", FOLLOW_UP)  # multi-turn: the server keeps the conversation
        page.keyboard.press("Enter")
        _wait_status(page, 2)
        assert bot.count() == 2
        assert bot.nth(1).text_content() == follow

        page.wait_for_selector("#prompt [data-testid=submit-button]", timeout=WAIT_MS)  # idle again
        page.wait_for_function("document.querySelector('#prompt [data-testid=status-tracker]').classList"
                               ".contains('hide')", timeout=WAIT_MS)
        shot = tmp / "web_chat.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 1000
        if os.environ.get("WEB_CHAT_SCREENSHOT"):
            shutil.copy(shot, os.environ["WEB_CHAT_SCREENSHOT"])

        assert page.locator("#chat button[aria-label=Share]").first.is_hidden()
        examples.first.click()  # an example puts its image in the input box
        page.wait_for_selector("#prompt .thumbnail-image", timeout=WAIT_MS)
    assert outside == [], f"the page requested files from elsewhere: {outside[:5]}"
    assert server.get("/health")["finished"] >= 2  # both answers came through the engine
    assert server.get("/v1/models")["data"][0]["id"] == "model"  # the OpenAI API in the same process
    assert OUTBOUND not in server.output(), server.output()



def test_a_bad_upload_is_one_note_and_the_next_question_works(web):
    """A file that is not an image (text under an image's name, so the page's own file-type check lets it
    through) gets one note in the chat and one line in the server's log; no error overlay stays over the
    page, and the next question, with a good image, is answered."""
    vlm, server, tmp = web
    (tmp / "notes.png").write_text("some notes, not an image\n")
    expect = vlm.chat([image(0)], messages(), max_new_tokens=MAX_TOKENS)
    with _chat_page(server.url) as (page, _):
        page.set_input_files("#prompt input[type=file]", str(tmp / "notes.png"))
        page.wait_for_selector("#prompt .thumbnail-item", timeout=WAIT_MS)  # uploaded
        page.fill("#prompt textarea", QUESTION)
        page.keyboard.press("Enter")
        # Whichever comes: a note in the chat or an error toast (a raised gr.Error, whose overlays stay).
        page.wait_for_function("document.querySelector('#chat .message.bot, .toast-body')", timeout=WAIT_MS)
        page.get_by_text("not a readable image").first.wait_for(timeout=WAIT_MS)  # drawn
        assert page.get_by_text("Error", exact=True).count() == 0  # no error toast or overlay ...
        assert page.get_by_text("not a readable image").count() == 1  # ... one message
        page.wait_for_function("document.querySelector('#prompt [data-testid=status-tracker]').classList"
                               ".contains('hide')", timeout=WAIT_MS)  # idle
        shot = tmp / "bad_upload.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("WEB_CHAT_BAD_UPLOAD_SCREENSHOT"):
            shutil.copy(shot, os.environ["WEB_CHAT_BAD_UPLOAD_SCREENSHOT"])
        note = page.locator("#chat .message.bot")
        assert note.count() == 1 and NOT_ANSWERED in note.inner_text() and "notes.png" in note.inner_text()
        assert page.input_value("#prompt textarea") == QUESTION  # the question stays; the bad file left the box
        assert page.locator("#prompt .thumbnail-item").count() == 0

        page.set_input_files("#prompt input[type=file]", str(tmp / "q.png"))
        page.wait_for_selector("#prompt .thumbnail-image", timeout=WAIT_MS)
        page.focus("#prompt textarea")
        page.keyboard.press("Enter")
        _wait_status(page, 1)
        answers = page.locator("#chat .message.bot .message-content")
        assert answers.count() == 1 and answers.nth(0).text_content() == expect  # the note made way for it
    log = server.log.read_text(errors="replace")
    assert len([line for line in log.splitlines() if "notes.png" in line]) == 1, log[-4000:]
    assert "Traceback" not in log, log[-4000:]

def _run(agen) -> list[tuple]:
    async def collect():
        return [update async for update in agen]

    return asyncio.run(collect())


def test_answers_stream_token_by_token_stop_and_equal_chat(web):
    vlm, _, tmp = web
    engine = Engine(vlm, max_batch_size=2)
    gate = threading.Semaphore(0)
    next_tokens = engine.batch.next_tokens

    def one_step_per_update():  # the engine waits until the page has shown the previous update
        assert gate.acquire(timeout=60)
        return next_tokens()

    engine.batch.next_tokens = one_step_per_update
    respond = make_respond(vlm, engine, Limits(max_tokens=16))
    ask = {"text": QUESTION, "files": [str(tmp / "q.png")]}

    async def scenario():  # one event loop for the whole conversation, as in the server
        first = []
        async for update in respond(ask, Conversation(), 0.0, 1.0, MAX_TOKENS, None):
            first.append(update)
            gate.release()  # the next step runs after this update was taken
        stopped = respond(ask, Conversation(), 0.0, 1.0, 4, None)
        await stopped.__anext__()
        await stopped.aclose()  # the stop button, or a closed page
        gate.release()
        for _ in range(200):  # the engine drops the job at its next step
            if engine.stats()["cancelled"]:
                break
            await asyncio.sleep(0.05)
        del engine.batch.next_tokens  # the follow-up runs freely
        second = [u async for u in respond({"text": FOLLOW_UP, "files": []}, first[-1][2], 0.0, 1.0, MAX_TOKENS,
                                           None)]
        return first, second

    engine.start()
    try:
        first, second = asyncio.run(scenario())
    finally:
        gate.release(100)
        engine.stop()

    assert engine.stats()["cancelled"] == 1 and engine.stats()["errors"] == 0
    conv = first[-1][2]
    answers = [u[2].messages[-1]["content"] for u in first]
    expect = vlm.chat([image(0)], messages(), max_new_tokens=MAX_TOKENS)
    assert answers[-1] == expect
    assert answers[0] == ""  # the question is shown before the first token
    partial = [a for a in dict.fromkeys(answers) if a]
    assert len(partial) >= 2 and all(expect.startswith(a) for a in partial), answers  # grew in steps
    assert first[-1][3].startswith("answer 1:") and "end of turn" in first[-1][3]
    assert conv.messages == messages() + [{"role": "assistant", "content": expect}]
    follow = vlm.chat([image(0)], conv.messages + [{"role": "user", "content": FOLLOW_UP}], max_new_tokens=MAX_TOKENS)
    assert second[-1][2].messages[-1]["content"] == follow
    assert len(second[-1][2].images) == 1 and second[-1][2].answers == 2


def _refused(update: tuple, conv: Conversation) -> str:
    """The note of a question that got no answer (the update's chat ends with it; the conversation is unchanged)."""
    chat, _, new_conv, _ = update
    assert new_conv is conv and chat[:-1] == conv.shown, chat
    assert chat[-1]["role"] == "assistant" and chat[-1]["metadata"]["title"] == NOT_ANSWERED, chat[-1]
    return chat[-1]["content"][0]["text"]


def _log_lines(caplog) -> list:
    return [r for r in caplog.records if r.name == "qwenvl_lab.serve.chat_page"]


def test_mistakes_are_one_message_and_generate_nothing(web, tmp_path, caplog):
    vlm, _, tmp = web
    engine = Engine(vlm)  # not started: nothing may reach it
    n_prompt = len(vlm.chat_ids([{"role": "user", "content": "<image>\n?"}], 1))
    respond = make_respond(vlm, engine, Limits(max_images=2, max_tokens=16, max_model_len=n_prompt + 10))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    q, broken = str(tmp / "q.png"), str(tmp_path / "broken.png")
    cases = {
        "empty": ({"text": " ", "files": []}, Conversation(), 16, "type a question"),
        "too many images": ({"text": "?", "files": [q, q, q]}, Conversation(), 16, "limit is 2"),
        "images over turns": ({"text": "?", "files": [q, q]}, Conversation(images=[image(1)]), 16, "limit is 2"),
        "bad image": ({"text": " ? ", "files": [q, broken]}, Conversation(), 16, "broken.png: not a readable"),
        "too long": ({"text": "?", "files": [q]}, Conversation(), 16 * 4, "max tokens"),
        "over the model length": ({"text": "?", "files": [q]}, Conversation(), 16, f"model length {n_prompt + 10}"),
    }
    for name, (message, conv, max_tokens, words) in cases.items():
        caplog.clear()
        updates = _run(respond(message, conv, 0.0, 1.0, max_tokens, None))
        assert len(updates) == 1, (name, updates)
        assert words in _refused(updates[0], conv), (name, updates[0][0])
        lines = _log_lines(caplog)  # one warning line, no traceback
        assert [(r.levelname, r.exc_info) for r in lines] == [("WARNING", None)], (name, lines)
        assert words in lines[0].getMessage() and "\n" not in lines[0].getMessage(), name
        box = updates[0][1]
        if name == "bad image":  # the unreadable file leaves the input box, the question and the good image stay
            assert box.value["text"] == " ? " and [f["orig_name"] for f in box.value["files"]] == ["q.png"]
        else:  # the input box is left as it is
            assert box == gr.skip(), (name, box)
    assert engine.stats()["waiting"] == 0 and engine.stats()["admitted"] == 0


def test_failures_are_one_note_and_bugs_keep_their_traceback(web, caplog, monkeypatch):
    vlm, _, tmp = web
    engine = Engine(vlm)
    ask = {"text": QUESTION, "files": [str(tmp / "q.png")]}

    def broken_step():
        raise RuntimeError("a broken decoding step")

    engine.batch.next_tokens = broken_step  # the engine logs the traceback and fails the job
    conv = Conversation()
    engine.start()
    try:
        updates = _run(make_respond(vlm, engine, Limits())(ask, conv, 0.0, 1.0, MAX_TOKENS, None))
    finally:
        engine.stop()
    chat, _, new_conv, _ = updates[-1]
    assert new_conv is conv and [m["role"] for m in chat] == ["user", "assistant"]  # the question stays in view
    assert chat[-1]["metadata"]["title"] == NOT_ANSWERED and "a broken decoding step" in chat[-1]["content"][0]["text"]
    lines = _log_lines(caplog)
    assert [(r.levelname, r.exc_info) for r in lines] == [("ERROR", None)], lines  # the engine logged the traceback

    def bug(*args):
        raise KeyError("a bug")

    caplog.clear()
    monkeypatch.setattr("qwenvl_lab.serve.chat_page.prepare", bug)
    updates = _run(make_respond(vlm, Engine(vlm), Limits())(ask, conv, 0.0, 1.0, MAX_TOKENS, None))
    assert len(updates) == 1 and "internal error (KeyError)" in _refused(updates[0], conv)
    lines = _log_lines(caplog)
    assert len(lines) == 1 and lines[0].levelname == "ERROR" and lines[0].exc_info[0] is KeyError  # the traceback


def test_offline_guard_refuses_and_reports_outside_requests(tmp_path):
    script = tmp_path / "fetch.py"  # 192.0.2.1 is a documentation address: never routed
    script.write_text("import socket, urllib.request\n"
                      "for attempt in (lambda: urllib.request.urlopen('http://192.0.2.1/', timeout=2),\n"
                      "                lambda: socket.socket().connect(('192.0.2.1', 443))):\n"
                      "    try:\n        attempt()\n    except OSError as e:\n        print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-m", "tests.offline_guard", str(script)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert f"{OUTBOUND} socket.getaddrinfo ('192.0.2.1', 80)" in out.stderr, out.stderr
    assert f"{OUTBOUND} socket.connect ('192.0.2.1', 443)" in out.stderr, out.stderr
    assert out.stdout.count("refused (this process must stay offline)") == 2, out.stdout


def test_command_line_mistakes_are_one_line(web, tmp_path, capsys, monkeypatch):
    from qwenvl_lab.core.cli import run_cli
    from qwenvl_lab.serve.web import main

    _, _, tmp = web
    model = str(tmp / "model")

    def error(argv: list[str]) -> str:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "nowhere" in error(["--model", str(tmp_path / "nowhere"), "--port", "0"])
    assert "--examples" in error(["--model", model, "--examples", str(tmp_path / "no_dir")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"127.0.0.1:{port}" in error(["--model", model, "--port", str(port)])
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    monkeypatch.delitem(sys.modules, "qwenvl_lab.serve.chat_page")
    assert "needs gradio" in error(["--model", model])
