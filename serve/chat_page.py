"""The web chat's Gradio page over one `Engine`: `build_ui(vlm, engine, name, limits, examples, ...) -> gr.Blocks`.

Contract:
- One conversation per browser session, kept on the server (`Conversation`): the model's messages in
  test.py's format (a user turn that brings images starts with one `<image>` per image, then a newline,
  then the text), every image placed so far in marker order, and what the chat shows. So a later turn
  sends the whole conversation with all its images, exactly as test.py's interactive chat does, and the
  answers it is given back are the model's own text (never the text after display formatting).
- `make_respond(vlm, engine, limits, request_timeout_s) -> respond`, the submit handler
  `respond(message, conversation, temperature, top_p, max_tokens, seed)` (`seed` < 0 or None: random), an
  async generator: it loads the uploaded images (`dataset.images.load_image` with `limits.max_pixels`), checks
  `limits.max_images` (for the whole conversation) and `limits.max_model_len`, submits one `Job` to the
  engine and yields (chat, input box, conversation, status) as text arrives. Temperature 0 is greedy, so
  its answers equal `vlm.chat`'s. A stopped or abandoned generation cancels its job; the partial answer
  stays in the conversation, as shown.
- A question that gets no answer is one update: the chat as it was plus one note (an assistant message
  titled `NOT_ANSWERED`, shown until the next question, never part of the conversation, which is
  unchanged), and one log line (logger "qwenvl_lab.serve.chat_page"). Never a raised `gr.Error`: its overlays stay over
  the chat and the input box and block the next question, and gradio logs its traceback. Its kinds:
  * the user's mistakes (no question, an unreadable image, too many images, a prompt too long, a full
    queue): a warning line; nothing is generated and the input stays in the box, less the unreadable files
    (named in the note), so that sending again works;
  * a failed generation (the engine has logged its traceback): an error line, the question stays in view;
  * a bug in the handler: the traceback in the log, "internal error" in the note.
- Answers and questions are shown verbatim (plain text, HTML-escaped, spaces kept: `CSS`, which the page
  needs). Nothing is fetched from outside: analytics are off, the theme's fonts are the ones gradio ships.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from ..core.errors import UserError
from ..dataset.images import load_image
from ..dataset.sample import IMAGE_MARKER
from .decode import SamplingParams
from .engine import Engine, QueueFull
from .protocol import Limits
from .session import RequestError, prepare, submit

log = logging.getLogger("qwenvl_lab.serve.chat_page")
NOT_ANSWERED = "Not answered"
FINISH_WORDS = {"stop": "end of turn", "length": "max tokens reached", "cancelled": "stopped",
                "timeout": "timed out"}
# The chat shows text as it is: spaces kept (gradio's plain-text messages collapse them otherwise). The
# per-message "share" button works only in a hosted Space (elsewhere it fails): hidden.
CSS = """#chat .message-content .md { white-space: pre-wrap; }
#chat button[aria-label="Share"] { display: none; }"""


@dataclass
class Conversation:
    messages: list[dict] = field(default_factory=list)  # the model's view, test.py's format
    images: list = field(default_factory=list)  # PIL images, in the order of the <image> markers
    shown: list[dict] = field(default_factory=list)  # the Chatbot's messages
    answers: int = 0


class Refused(Exception):
    """Why a question gets no answer (see the module docstring). `box`: the input box's new value (None: left
    as it is); `turn`: the question as the chat showed it, when it had already left the box; `level`: the log
    line's level."""

    def __init__(self, message: str, box: dict | None = None, turn: dict | None = None,
                 level: int = logging.WARNING) -> None:
        super().__init__(message)
        self.message, self.box, self.turn, self.level = message, box, turn, level


def _shown(text: str) -> dict:
    """A Chatbot text part that displays `text` verbatim: plain text (no Markdown), and HTML-escaped because
    gradio inserts even plain-text messages as (sanitised) HTML, which would swallow `<...>`."""
    return {"type": "text", "text": html.escape(text, quote=False)}


def _idle_box():
    return gr.MultimodalTextbox(submit_btn=True, stop_btn=False)  # only these two properties change


def _user_turn(text: str, n_new_images: int) -> str:
    return IMAGE_MARKER * n_new_images + ("\n" if n_new_images else "") + text


def _load(paths: list[str], max_pixels: int, text: str) -> list:
    images, problems, kept = [], [], []
    for p in paths:
        try:
            images.append(load_image(p, max_pixels))
            kept.append(p)
        except UserError as e:  # the message names gradio's cache path: name the file the user chose
            problems.append(str(e).replace(str(p), Path(p).name))
    if problems:
        raise Refused(f"{'; '.join(problems)}. Taken out of the input box: upload an image file (PNG, JPEG, "
                      "WebP, ...) and send again", box={"text": text, "files": kept})
    return images


def _sampling(temperature: float, top_p: float, max_tokens: float, seed: float | None,
              limits: Limits) -> SamplingParams:
    if not 0 <= temperature <= 2 or not 0 < top_p <= 1 or not 1 <= max_tokens <= limits.max_tokens:
        raise Refused(f"temperature must be in [0, 2], top-p in (0, 1] and max tokens in [1, {limits.max_tokens}]")
    return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                          seed=None if seed is None or seed < 0 else int(seed))


def _note(message: str) -> dict:
    """The chat's note for a question that got no answer."""
    return {"role": "assistant", "content": [_shown(message)], "metadata": {"title": NOT_ANSWERED}}


def _refusal(conv: Conversation, message: str, e: Exception | None) -> tuple:
    """The one update after a question got no answer: the conversation as it was, the question (when it had
    left the input box) and the note; the conversation state itself is unchanged."""
    turn = [e.turn] if isinstance(e, Refused) and e.turn else []
    box = gr.MultimodalTextbox(value=e.box) if isinstance(e, Refused) and e.box is not None else gr.skip()
    return conv.shown + turn + [_note(message)], box, conv, ""


def make_respond(vlm: Any, engine: Engine, limits: Limits, request_timeout_s: float = 600.0):
    """The submit handler (see the module docstring)."""
    answer = _make_answer(vlm, engine, limits, request_timeout_s)

    async def respond(message: dict | None, conv: Conversation, temperature: float, top_p: float,
                      max_tokens: float, seed: float | None):
        try:  # aclosing: the stop button or a closed page closes `answer` too, which cancels its job
            async with contextlib.aclosing(answer(message, conv, temperature, top_p, max_tokens, seed)) as updates:
                async for update in updates:
                    yield update
        except Refused as e:
            log.log(e.level, "not answered: %s", " ".join(e.message.split()))
            yield _refusal(conv, e.message, e)
        except Exception as e:  # a bug: its traceback goes to the log, the page stays usable
            log.exception("the answer failed")
            yield _refusal(conv, f"internal error ({type(e).__name__}); the server's log has the details", e)

    return respond


def _make_answer(vlm: Any, engine: Engine, limits: Limits, request_timeout_s: float):
    """`respond` without its error handling: raises `Refused` for a question that gets no answer."""

    async def answer_updates(message: dict | None, conv: Conversation, temperature: float, top_p: float,
                             max_tokens: float, seed: float | None):
        text = ((message or {}).get("text") or "").strip()
        files = list((message or {}).get("files") or [])
        if not text and not files:
            raise Refused("type a question (and upload images with the clip button)")
        params = _sampling(temperature, top_p, max_tokens, seed, limits)
        if len(conv.images) + len(files) > limits.max_images:
            raise Refused(f"this conversation would hold {len(conv.images) + len(files)} images; the limit is "
                          f"{limits.max_images} (--max-images). Clear the chat to start a new one.")
        new_images = await asyncio.to_thread(_load, files, limits.max_pixels, (message or {}).get("text") or "")
        messages = conv.messages + [{"role": "user", "content": _user_turn(text, len(new_images))}]
        images = conv.images + new_images
        try:
            ids, image_inputs = await asyncio.to_thread(prepare, vlm, messages, images, params.max_tokens, limits)
        except RequestError as e:
            hint = " or clear the chat" if e.param == "max_tokens" else ""
            raise Refused(f"{e.message}{hint}") from e
        try:
            job, events = submit(engine, ids, image_inputs, params, [], request_timeout_s)
        except QueueFull as e:
            raise Refused(f"the server is busy ({e}); try again in a moment") from e

        # gr.Image rather than a bare file: its own buttons, without the share-to-the-hub one.
        user = {"role": "user", "content": [gr.Image(p, buttons=["fullscreen"], show_label=False) for p in files]
                + ([_shown(text)] if text else [])}
        start, answer, done = time.monotonic(), "", False

        def state(status: str, box: Any) -> tuple:
            shown = conv.shown + [user, {"role": "assistant", "content": [_shown(answer)]}]
            new = Conversation(messages + [{"role": "assistant", "content": answer}], images, shown,
                               conv.answers + 1)
            return shown, box, new, status

        try:
            # The question leaves the input box, which shows the stop button until the answer ends; later
            # updates leave the box alone (the next question may be typed meanwhile).
            yield state("generating ...", gr.MultimodalTextbox(value=None, submit_btn=False, stop_btn=True))
            while not done:
                batch = [await events.get()]
                while not events.empty():  # everything already decoded goes out in one update
                    batch.append(events.get_nowait())
                for kind, data in batch:
                    if kind == "delta":
                        answer += data
                    elif kind == "error":  # the engine has logged the traceback
                        raise Refused(str(data), turn=user, level=logging.ERROR)
                    else:
                        done = True
                if not done:
                    yield state("generating ...", gr.skip())
            took = time.monotonic() - start
            yield state(f"answer {conv.answers + 1}: {len(job.tokens)} tokens in {took:.1f} s, "
                        f"{FINISH_WORDS.get(job.finish_reason, job.finish_reason)}", _idle_box())
        finally:
            if job.finish_reason is None:
                job.cancel()  # the stop button or a closed page: free the batch row

    return answer_updates


def build_ui(vlm: Any, engine: Engine, name: str, limits: Limits, examples: list[Path],
             request_timeout_s: float = 600.0) -> gr.Blocks:
    respond = make_respond(vlm, engine, limits, request_timeout_s)

    def clear():
        return [], None, Conversation(), ""

    with gr.Blocks(title=f"{name} - web chat", analytics_enabled=False, delete_cache=(3600, 86400)) as ui:
        gr.Markdown(f"### Chat with `{name}`", elem_id="model-name")
        chat = gr.Chatbot(elem_id="chat", label=name, render_markdown=False, height=460, buttons=["copy", "copy_all"])
        box = gr.MultimodalTextbox(elem_id="prompt", file_types=["image"], file_count="multiple",
                                   sources=["upload"], placeholder="Ask about the images (upload with the clip)",
                                   show_label=False, autofocus=True)
        status = gr.Markdown("", elem_id="status")
        with gr.Accordion("Sampling", open=True):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature", info="0 = greedy",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p", elem_id="top-p")
                max_tokens = gr.Slider(1, limits.max_tokens, value=limits.default_max_tokens, step=1,
                                       label="max tokens", elem_id="max-tokens")
                seed = gr.Number(value=-1, precision=0, label="seed", info="-1 = random", elem_id="seed")
        clear_btn = gr.Button("Clear the chat", elem_id="clear")
        if examples:
            gr.Examples([[{"text": "", "files": [str(p)]}] for p in examples], inputs=[box],
                        label="Examples (click one, then ask)", examples_per_page=len(examples), elem_id="examples")
        conv = gr.State(Conversation())

        submitted = box.submit(respond, [box, conv, temperature, top_p, max_tokens, seed],
                               [chat, box, conv, status], concurrency_limit=None, api_visibility="private")
        submitted.then(_idle_box, None, box, api_visibility="private")  # also after the stop button or an error
        box.stop(None, None, None, cancels=[submitted])
        clear_btn.click(clear, None, [chat, box, conv, status], cancels=[submitted], api_visibility="private")
        chat.clear(clear, None, [chat, box, conv, status], cancels=[submitted], api_visibility="private")
    return ui
