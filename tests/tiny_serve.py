"""Fixtures for serving and export tests: a tiny random VLM whose greedy answer ends with end-of-turn.

`stopping_vlm(tmp_path, **build_kw) -> VLM`: `tests.tiny_model.build_tiny_vlm` (CLIP tower + Qwen2 LM by
default) with random weights, edited so that its greedy answer to `QUESTION` about `image(0, size)` stops with
the end-of-turn token after a few tokens: the end-of-turn row of the output head becomes 1.01 x the row of
the answer's first token that appears only once so far, so at that step the end-of-turn logit just beats
it (and nowhere earlier, where that token was not the argmax). No training needed, and the stop is what a
trained model does, so a generation that ignores end-of-turn runs on past it.
`image(i)`: a small RGB test picture; `data_url(img)`: the image as a PNG `data:` URL.
"""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from tests.tiny_model import build_tiny_vlm, randomize_

QUESTION = "What is in the picture?"
MAX_PROBE = 8  # tokens looked at when choosing where the answer stops


def image(i: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    img = Image.new("RGB", size, (40 * i % 256, 200 - 25 * i % 200, 90 + 13 * i % 160))
    for x in range(size[0] // 2):  # a diagonal so that images differ in structure, not only colour
        img.putpixel((x, min(size[1] - 1, (x * (i + 1)) % size[1])), (255, 255, 255))
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(question: str = QUESTION, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": "<image>" * n_images + "\n" + question}]


def _printable_only(vlm) -> None:
    """Zero the output-head rows of every token that is not printable ASCII text (bytes >= 128, controls,
    special tokens, spare rows): their logits are 0, below the best of ~100 random printable rows, so greedy
    answers are readable text."""
    head = vlm.lm.get_output_embeddings()
    with torch.no_grad():
        for t in range(head.weight.shape[0]):
            text = vlm.decode([t])
            if not (text and text.isascii() and text.isprintable()):
                head.weight[t] = 0.0


def _greedy(vlm, ids, img, n: int) -> list[int]:
    with torch.no_grad():
        return vlm.generate(torch.tensor([ids]), None, vlm.image_processor([img]), max_new_tokens=n,
                            stop_token_ids=[])[0]


def stopping_vlm(tmp_path, seed: int = 3, size: tuple[int, int] = (40, 30), **build_kw):
    """See the module docstring; `size` is the size of `image(0)` that the stop is tuned on."""
    vlm = build_tiny_vlm(tmp_path, **build_kw)
    img, msgs = image(0, size), messages()
    ids = vlm.chat_ids(msgs, 1)
    head = vlm.lm.get_output_embeddings()
    end_of_turn = vlm.stop_token_ids[0]
    for s in range(seed, seed + 20):  # a seed whose answer does not loop on one token at once
        randomize_(vlm, seed=s)
        vlm.eval()
        _printable_only(vlm)
        out = _greedy(vlm, ids, img, MAX_PROBE)
        # The stop goes at the first k >= 2 whose token is new in the answer and has a positive logit there
        # (so 1.01 x wins): the answer is then k tokens.
        for k in (i for i in range(2, len(out)) if out[i] not in out[:i]):
            with torch.no_grad():
                head.weight[end_of_turn] = 1.01 * head.weight[out[k]]
            stopped = _greedy(vlm, ids, img, k + 1)
            if stopped[:k] == out[:k] and stopped[k] == end_of_turn:
                return vlm
            break  # a negative logit: try the next seed rather than more k (each try is a generation)
    raise AssertionError("no random tiny VLM stopped where wanted; widen the seed range")
