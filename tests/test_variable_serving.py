"""Serving and evaluation with images at their own resolution (anyres, native, naflex), in process.

- `serve.session.prepare` counts each image's span with `vlm.image_tokens` and gives `vlm.image_inputs`;
  decode rows built from it (several rows with images of different sizes in one prefill, and rows joining a
  running batch) give `vlm.chat`'s greedy answers;
- the engine (several jobs admitted together) and the API (one request, then several at once) give the same;
- `max_model_len` counts the variable spans (a fixed count would have let the prompt through); an image the
  native rule refuses is a 400 on "messages";
- fixed mode: `prepare` is today's ids and pixel values;
- evaluation: likelihood scores equal teacher forcing on the model's own image inputs, a generation task's
  batched answers equal `vlm.chat`, the likelihood multiple-choice mode runs.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from qwenvl_lab.evaluation.likelihood import rank_options, reply_logprobs
from qwenvl_lab.evaluation.runner import read_answers, run_task
from qwenvl_lab.serve.decode import DecodeBatch, Row, SamplingParams
from qwenvl_lab.serve.engine import Engine, Job
from qwenvl_lab.serve.protocol import Limits
from qwenvl_lab.serve.session import RequestError, prepare
from qwenvl_lab.visual.pixels import META_KEYS

from tests import tiny_bench as tb
from tests import tiny_visual as tv
from tests.test_serve_decode import generate_rows
from tests.tiny_model import build_tiny_vlm, randomize_
from tests.tiny_serve import data_url, image

N = 4  # new tokens per answer
MODES = ["anyres", "native", "naflex"]
PINS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # the tiny CLIP's 32 px crops
KEYS = {"anyres": {"pixel_values", "image_sizes", "image_crops"},
        "native": {"pixel_values", "image_sizes", "image_grid"},
        "naflex": {"pixel_values", "image_sizes", "image_grid"}}
# (images as (width, height), question): spans of different lengths, 0, 1 and 2 images per conversation.
CONVS = [
    ([(64, 48)], "what is it?"),
    ([(20, 70), (90, 30)], "the same?"),
    ([], "a question with no image at all"),
    ([(48, 48)], "a square one, and a longer question about it"),
]


def variable_vlm(tmp_path, mode: str):
    """A tiny random VLM of the given resolution mode (CLIP 32 px / patch 8; SigLIP2 NaFlex, 24 patches)."""
    if mode == "anyres":
        vlm = build_tiny_vlm(tmp_path, tower="clip", image_grid_pinpoints=PINS)
    elif mode == "native":
        vlm = build_tiny_vlm(tmp_path, tower="clip", max_pixels=64 * 64, reduce="pixel_shuffle", reduce_factor=2)
    else:
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

        path = tv.save_tiny_siglip2(Path(tmp_path) / "siglip2", num_patches=16, patch_size=8)
        Siglip2ImageProcessorPil(patch_size=8, max_num_patches=24).save_pretrained(path)  # the NaFlex budget
        vlm = build_tiny_vlm(tmp_path, towers=[{"backend": "hf_siglip2", "name_or_path": str(path),
                                                "feature_layer": -2, "select": "patch"}])
    assert vlm.resolution.mode == mode
    randomize_(vlm, seed=3)
    return vlm.eval()


@pytest.fixture(scope="module", params=MODES)
def vlm(request, tmp_path_factory):
    return variable_vlm(tmp_path_factory.mktemp(request.param), request.param)


def marked(imgs: list, question: str) -> list[dict]:
    """One user turn as the API writes it: an `<image>` per image part, a newline, then the text."""
    return [{"role": "user", "content": "<image>" * len(imgs) + ("\n" if imgs else "") + question}]


def cases() -> list[tuple[list, str]]:
    return [([image(i + j, s) for j, s in enumerate(sizes)], q) for i, (sizes, q) in enumerate(CONVS)]


def convs() -> list[tuple[list, list[dict]]]:
    return [(imgs, marked(imgs, q)) for imgs, q in cases()]


def expected(vlm) -> list[str]:
    return [vlm.chat(imgs, m, max_new_tokens=N, stop_token_ids=[]) for imgs, m in convs()]


def test_prepare_counts_spans_and_rows_equal_chat_alone_and_joining(vlm):
    expect = expected(vlm)
    rows, counts = [], []
    for imgs, m in convs():
        ids, inputs = prepare(vlm, m, imgs, N, Limits(max_model_len=None))
        want = [vlm.resolution.layout(*im.size, len(imgs)).tokens for im in imgs]
        assert ids.count(vlm.image_token_id) == sum(want)  # the variable spans, not tokens_per_image each
        assert set(inputs) == (KEYS[vlm.resolution.mode] if imgs else set())
        assert all(len(inputs[k]) == len(imgs) for k in META_KEYS if k in inputs)  # one row per image
        counts += want
        rows.append((ids, inputs))
    assert len(set(counts)) > 1  # the images really get different counts
    fresh = lambda: [Row(ids, inp, SamplingParams(max_tokens=N)) for ids, inp in rows]  # noqa: E731
    together = generate_rows(vlm, fresh(), stop_token_ids=[])  # one prefill: every key concatenated row by row
    assert [vlm.decode(t) for t in together] == expect

    pending, batch, step = fresh(), DecodeBatch(vlm), 0  # rows 2 and 3 join after 2 steps of rows 0 and 1
    batch.add(pending[:2])
    while batch.rows or step <= 2:
        if step == 2:
            batch.add(pending[2:])
        tokens = batch.next_tokens()
        for r, t in zip(batch.rows, tokens):
            r.tokens.append(t)
        batch.advance(tokens, [len(r.tokens) < N for r in batch.rows])
        step += 1
    assert [vlm.decode(r.tokens) for r in pending] == expect


def _run_engine(vlm, jobs: list[Job]) -> Engine:
    engine = Engine(vlm, max_batch_size=8, max_queue=8)
    for j in jobs:  # all queued before the thread starts: admitted and prefilled together
        engine.submit(j)
    engine.start()
    try:
        deadline = time.monotonic() + 300
        while any(j.finish_reason is None for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        engine.stop()
    return engine


def test_engine_one_and_several_requests_equal_chat(vlm):
    expect = expected(vlm)
    jobs = []
    for imgs, m in convs():
        ids, inputs = prepare(vlm, m, imgs, N, Limits())
        jobs.append(Job(ids, inputs, SamplingParams(max_tokens=N, ignore_eos=True), emit=lambda kind, data: None))
    alone = _run_engine(vlm, [jobs[1]])  # the two-image request on its own
    assert jobs[1].finish_reason == "length" and jobs[1].text == expect[1]
    assert alone.stats()["errors"] == 0
    for j in jobs:
        j.finish_reason, j.row = None, None
    engine = _run_engine(vlm, jobs)
    assert [j.finish_reason for j in jobs] == ["length"] * len(jobs)
    assert [j.text for j in jobs] == expect
    assert engine.stats()["max_batch"] == len(jobs)


# ----- the API in process ---------------------------------------------------------------------------------
def _client(vlm, limits: Limits):
    pytest.importorskip("fastapi", reason="the server needs fastapi (pip install .[serve])")
    from fastapi.testclient import TestClient
    from qwenvl_lab.serve.app import create_app

    engine = Engine(vlm, max_batch_size=8, max_queue=8)
    return TestClient(create_app(vlm, engine, "m", limits)), engine


def _body(imgs: list, question: str, max_tokens: int = N) -> dict:
    """The images as image_url parts before the text: the server writes `<image>`... then a newline."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in imgs]
    return {"model": "m", "messages": [{"role": "user", "content": parts + [{"type": "text", "text": question}]}],
            "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}


def test_api_one_and_concurrent_requests_equal_chat(vlm):
    client, engine = _client(vlm, Limits(max_images=4))
    todo = cases()
    expect = expected(vlm)
    engine.start()
    try:
        with client:
            r = client.post("/v1/chat/completions", json=_body(*todo[1]))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expect[1]
            n_prompt = len(vlm.chat_ids(marked(*todo[1]), 2, vlm.image_tokens(todo[1][0])))
            assert r.json()["usage"]["prompt_tokens"] == n_prompt  # the variable spans counted

            def ask(case):
                return client.post("/v1/chat/completions", json=_body(*case)).json()

            with ThreadPoolExecutor(len(todo)) as pool:
                answers = list(pool.map(ask, todo))
    finally:
        engine.stop()
    assert [a["choices"][0]["message"]["content"] for a in answers] == expect


def test_max_model_len_counts_variable_spans(vlm):
    imgs, q = cases()[1]
    msgs = marked(imgs, q)
    ids, _ = prepare(vlm, msgs, imgs, N, Limits(max_model_len=None))
    fixed = len(vlm.chat_ids(msgs, len(imgs)))  # every image tokens_per_image
    assert len(ids) != fixed
    prepare(vlm, msgs, imgs, N, Limits(max_model_len=len(ids) + N))  # exactly fits
    with pytest.raises(RequestError, match=f"the prompt has {len(ids)} tokens") as e:
        prepare(vlm, msgs, imgs, N, Limits(max_model_len=len(ids) + N - 1))
    assert e.value.param == "max_tokens"
    client, engine = _client(vlm, Limits(max_model_len=len(ids) + N - 1))
    with client:
        r = client.post("/v1/chat/completions", json=_body(imgs, q))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert f"the prompt has {len(ids)} tokens" in r.json()["error"]["message"]


def test_an_image_the_native_rule_refuses_is_one_400_on_messages(tmp_path):
    vlm = variable_vlm(tmp_path, "native")
    thin = image(0, (1, 300))  # aspect ratio 300 > 200: smart_resize refuses it
    with pytest.raises(RequestError, match="aspect ratio over 200") as e:
        prepare(vlm, marked([thin], "what?"), [thin], N, Limits())
    assert e.value.param == "messages"
    client, _ = _client(vlm, Limits())
    with client:
        r = client.post("/v1/chat/completions", json=_body([thin], "what?"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "aspect ratio over 200" in r.json()["error"]["message"]


def test_fixed_mode_prepare_is_unchanged(tmp_path):
    vlm = build_tiny_vlm(tmp_path).eval()
    imgs, m = convs()[1]
    ids, inputs = prepare(vlm, m, imgs, N, Limits())
    assert vlm.resolution.mode == "fixed" and vlm.image_tokens(imgs) is None
    assert ids == vlm.chat_ids(m, 2) and ids.count(vlm.image_token_id) == 2 * vlm.tokens_per_image
    assert set(inputs) == {"pixel_values"}
    torch.testing.assert_close(inputs["pixel_values"], vlm.image_processor(imgs), rtol=0, atol=0)
    assert prepare(vlm, convs()[2][1], [], N, Limits())[1] == {}


def test_web_chat_two_turns_with_images_of_different_sizes_equal_chat(vlm, tmp_path):
    import asyncio

    pytest.importorskip("gradio", reason="the web chat needs gradio (pip install .[serve])")
    from qwenvl_lab.serve.chat_page import Conversation, make_respond

    for i, size in enumerate([(64, 48), (90, 30)]):
        image(i, size).save(tmp_path / f"{i}.png")
    engine = Engine(vlm, max_batch_size=2)
    respond = make_respond(vlm, engine, Limits(max_images=4, max_tokens=16))

    async def two_turns():
        first = [u async for u in respond({"text": "what is it?", "files": [str(tmp_path / "0.png")]},
                                          Conversation(), 0.0, 1.0, N, None)]
        second = [u async for u in respond({"text": "and this one?", "files": [str(tmp_path / "1.png")]},
                                           first[-1][2], 0.0, 1.0, N, None)]
        return first[-1][2], second[-1][2]

    engine.start()
    try:
        after_one, after_two = asyncio.run(two_turns())
    finally:
        engine.stop()
    assert (len(after_one.messages), len(after_two.messages), len(after_two.images)) == (2, 4, 2)
    for conv in (after_one, after_two):  # each answer is vlm.chat's on the conversation up to its question
        n = sum(m["content"].count("<image>") for m in conv.messages)
        want = vlm.chat(conv.images[:n], conv.messages[:-1], max_new_tokens=N)
        assert conv.messages[-1] == {"role": "assistant", "content": want}


# ----- evaluation ----------------------------------------------------------------------------------------
def test_likelihood_equals_teacher_forcing_on_variable_images(vlm, tmp_path):
    imgs = [image(1, (20, 70)), image(2, (90, 30))]
    msgs = [{"role": "user", "content": "<image> and <image>\nWhich colour?\nA. red\nB. dark green"}]
    options = ["red", "dark green", "a much longer option text"]
    got = reply_logprobs(vlm, imgs, msgs, options)  # one padded batch, the images once per row
    counts = vlm.image_tokens(imgs)
    base = vlm.chat_ids(msgs, 2, counts)
    for opt, (total, n, _) in zip(options, got):
        full = vlm.chat_ids(msgs + [{"role": "assistant", "content": opt}], 2, counts)
        with torch.no_grad():
            logits = vlm(torch.tensor([full]), **vlm.image_inputs(imgs), return_logits=True).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        want = sum(lp[p - 1, full[p]].item() for p in range(len(base), len(base) + n))
        assert total == pytest.approx(want, abs=1e-3)
    means = [t / n for t, n, _ in got]
    assert rank_options(vlm, imgs, msgs, options) == max(range(3), key=lambda i: means[i])

    res = run_task(vlm, "mmbench", str(tb.write_mmbench(tmp_path / "mmb")), mc_mode="likelihood",
                   output=tmp_path / "o", progress=False)
    assert res["n_scored"] > 0 and set(read_answers(tmp_path / "o" / "answers.jsonl").values()) <= {"A", "B", "C"}


VQA_SIZES = [(64, 48), (20, 70), (90, 30)]


def write_vqav2_sizes(root):
    """tiny_bench's VQAv2 pair with its three images at different sizes."""
    from PIL import Image

    root, images = tb.write_vqav2(root)
    for path, size in zip(sorted(images.iterdir()), VQA_SIZES):
        Image.open(path).convert("RGB").resize(size).save(path, format="PNG")
    return root, images


def test_generation_task_batched_equals_chat(vlm, tmp_path):
    from PIL import Image

    root, images = write_vqav2_sizes(tmp_path / "vqav2")
    res = run_task(vlm, "vqav2", str(root), images=str(images), output=tmp_path / "o", batch_size=3,
                   max_new_tokens=N, progress=False)
    assert res["n_scored"] == 3
    answers = read_answers(tmp_path / "o" / "answers.jsonl")
    questions = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    for q in questions:
        img = Image.open(images / f"COCO_val2014_{q['image_id']:012d}.jpg").convert("RGB")
        text = res["prompt"].replace("{question}", q["question"])
        want = vlm.chat([img], [{"role": "user", "content": "<image>\n" + text}], max_new_tokens=N)
        assert answers[str(q["question_id"])] == want


# ----- a transformers llava_next directory through test.py, the evaluation CLI and the server ---------------
@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory):
    """Our tiny anyres VLM exported as transformers' LLaVA-NeXT (config.json model_type "llava_next", no
    vlm_config.json), with its tokenizer and image processor, as tests/test_anyres.py's round trip does."""
    from qwenvl_lab.model.export import export_llava_hf

    tmp = tmp_path_factory.mktemp("llava_next")
    vlm = build_tiny_vlm(tmp, tower="clip", image_grid_pinpoints=PINS, multi_image="anyres")
    randomize_(vlm, seed=3)
    dst = export_llava_hf(vlm.eval(), tmp / "next")
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llava_next"
    image(0, (64, 48)).save(tmp / "q.png")
    return dst, tmp / "q.png"


def test_llava_next_dir_is_a_model_dir(llava_next_dir, tmp_path):
    import shutil

    from qwenvl_lab.model.paths import is_llava_dir, resolve_model_dir

    dst, _ = llava_next_dir
    assert is_llava_dir(dst) and resolve_model_dir(dst) == dst
    shutil.copytree(dst, tmp_path / "run" / "final")  # a run directory holding one
    assert resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "final"


def test_llava_next_dir_answers_through_test_py_evaluation_and_server(llava_next_dir, tmp_path, capsys):
    import argparse

    from PIL import Image
    from qwenvl_lab.evaluation.__main__ import main as eval_main
    from qwenvl_lab.model import VLM
    from qwenvl_lab.serve.cli import add_server_args, build

    from tests.tiny_server import answer_of_test_py, free_port

    dst, png = llava_next_dir
    vlm = VLM.from_pretrained(dst).eval()
    assert vlm.resolution.mode == "anyres"
    img = Image.open(png).convert("RGB")
    want = vlm.chat([img], marked([img], "what is it?"), max_new_tokens=N)
    got = answer_of_test_py(["--model", str(dst), "--image", str(png), "--prompt", "what is it?",
                             "--max-new-tokens", str(N), "--device", "cpu"], capsys)
    assert got == want

    root, images = write_vqav2_sizes(tmp_path / "vqav2")
    args = ["--model", str(dst), "--task", "vqav2", "--data", str(root), "--images", str(images),
            "--max-new-tokens", str(N), "--device", "cpu"]
    assert eval_main(args + ["--output", str(tmp_path / "cli")]) == 0
    run_task(vlm, "vqav2", str(root), images=str(images), output=tmp_path / "mem", batch_size=1,
             max_new_tokens=N, progress=False)
    assert read_answers(tmp_path / "cli" / "answers.jsonl") == read_answers(tmp_path / "mem" / "answers.jsonl")

    pytest.importorskip("fastapi", reason="the server needs fastapi (pip install .[serve])")
    from fastapi.testclient import TestClient

    ap = argparse.ArgumentParser()
    add_server_args(ap, port=free_port())
    app, engine, _ = build(ap.parse_args(["--model", str(dst), "--device", "cpu"]))
    engine.start()
    try:
        with TestClient(app) as client:
            body = _body([img], "what is it?")
            body.update(model=client.get("/v1/models").json()["data"][0]["id"], ignore_eos=False)
            r = client.post("/v1/chat/completions", json=body)
    finally:
        engine.stop()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want


def test_an_item_whose_image_the_native_rule_refuses_is_skipped_and_counted(tmp_path):
    from PIL import Image

    vlm = variable_vlm(tmp_path, "native")
    root, images = write_vqav2_sizes(tmp_path / "vqav2")
    first = sorted(images.iterdir())[0]
    Image.open(first).convert("RGB").resize((1, 300)).save(first, format="PNG")  # aspect ratio 300 > 200
    res = run_task(vlm, "vqav2", str(root), images=str(images), output=tmp_path / "o", batch_size=3,
                   max_new_tokens=N, progress=False)
    assert res["n_answered"] == 2 and res["skipped"] == {"bad_image": 1}
    assert "aspect ratio over 200" in res["skipped_examples"][0]


def test_test_py_answers_a_saved_native_model_and_refuses_a_size_in_one_line(tmp_path, capsys):
    from qwenvl_lab.core.cli import run_cli

    from tests.tiny_server import answer_of_test_py, entry

    vlm = variable_vlm(tmp_path, "native")
    vlm.save_pretrained(tmp_path / "model")
    img, thin = image(0, (64, 48)), image(1, (1, 300))
    img.save(tmp_path / "q.png")
    thin.save(tmp_path / "thin.png")
    want = vlm.chat([img], marked([img], "what is it?"), max_new_tokens=N)
    args = ["--model", str(tmp_path / "model"), "--prompt", "what is it?", "--max-new-tokens", str(N),
            "--device", "cpu"]
    assert answer_of_test_py(args + ["--image", str(tmp_path / "q.png")], capsys) == want
    assert run_cli(entry("test").main, args + ["--image", str(tmp_path / "thin.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"error: --image {tmp_path / 'thin.png'}: ")
    assert "aspect ratio over 200" in err.splitlines()[-1]
