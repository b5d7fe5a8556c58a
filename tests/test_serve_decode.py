"""Step-wise batched decoding (serve/decode.py) and streamed text (serve/text.py), in process: greedy rows
give `vlm.chat`'s answers for both LM backends, also when rows join a running batch mid-way."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from qwenvl_lab.serve.decode import DecodeBatch, Row, SamplingParams, sample_token
from qwenvl_lab.serve.text import TextStream

from tests.tiny_model import build_tiny_vlm, randomize_
from tests.tiny_serve import image

N_TOKENS = 4


def generate_rows(vlm: Any, rows: list[Row], stop_token_ids: list[int] | None = None) -> list[list[int]]:
    """Run `rows` to completion in one batch (the plain loop, up to `max_tokens`): new tokens per row, the
    stop token excluded."""
    stops = set(vlm.stop_token_ids if stop_token_ids is None else stop_token_ids)
    batch = DecodeBatch(vlm)
    batch.add(rows)
    while batch.rows:
        tokens = batch.next_tokens()
        keep = []
        for r, t in zip(batch.rows, tokens):
            stopped = t in stops and not r.params.ignore_eos
            if not stopped:
                r.tokens.append(t)
            keep.append(not stopped and len(r.tokens) < r.params.max_tokens)
        batch.advance(tokens, keep)
    return [r.tokens for r in rows]


def _convs():
    # Different prompt lengths and image counts, so rows are padded differently.
    return [([image(i)] * (1 + i % 2), [{"role": "user", "content": "<image>" * (1 + i % 2) + "\nwhat" + " is it" * i}])
            for i in range(3)]


@pytest.mark.parametrize("backend", ["qwen", "hf"])
def test_greedy_rows_equal_chat_alone_and_when_joining_mid_batch(tmp_path, backend):
    vlm = build_tiny_vlm(tmp_path, lm_backend=backend)
    randomize_(vlm, seed=3)
    vlm.eval()
    convs = _convs()
    expect = [vlm.chat(imgs, msgs, max_new_tokens=N_TOKENS, stop_token_ids=[]) for imgs, msgs in convs]

    def rows():
        return [Row(vlm.chat_ids(m, len(im)), vlm.image_processor(im), SamplingParams(max_tokens=N_TOKENS))
                for im, m in convs]

    together = generate_rows(vlm, rows(), stop_token_ids=[])
    assert [vlm.decode(t) for t in together] == expect
    assert all(len(t) == N_TOKENS for t in together)

    # Row 2 joins after 2 steps of rows 0 and 1; rows leave as they finish.
    pending, batch, step = rows(), DecodeBatch(vlm), 0
    batch.add(pending[:2])
    joins = {2: pending[2]}
    while batch.rows or step <= 2:
        if step in joins:
            batch.add([joins[step]])
        tokens = batch.next_tokens()
        for r, t in zip(batch.rows, tokens):
            r.tokens.append(t)
        batch.advance(tokens, [len(r.tokens) < N_TOKENS for r in batch.rows])
        step += 1
    assert [vlm.decode(r.tokens) for r in pending] == expect
    assert batch.can_merge


def test_sampling_follows_its_seed_and_filters():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    flat = torch.zeros(1000)  # 1000 equally likely tokens: unseeded rows repeat each other only by chance

    def draws(params: SamplingParams) -> list[int]:
        row = Row([1], None, params)  # the row seeds its own generator from params.seed
        return [sample_token(flat, params, row.generator) for _ in range(20)]

    seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=0)
    assert draws(seeded) == draws(seeded) != draws(SamplingParams(max_tokens=1, temperature=1.0, seed=1))
    unseeded = SamplingParams(max_tokens=1, temperature=1.0)
    assert draws(unseeded) != draws(unseeded)
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, SamplingParams(1, 1.0, top_k=1), g) for _ in range(20)} == {0}
    # top_p 0.5: token 0 alone holds ~0.61 of the mass, so it is the only one kept
    assert {sample_token(logits, SamplingParams(1, 1.0, top_p=0.5), g) for _ in range(20)} == {0}
    # At an exact tie the better tokens' mass equals top_p: kept, as vlm.chat(do_sample=True) keeps it.
    assert {sample_token(torch.zeros(2), SamplingParams(1, 1.0, top_p=0.5), g) for _ in range(40)} == {0, 1}
    assert sample_token(logits, SamplingParams(1, 0.0), None) == 0  # temperature 0 is argmax


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    pieces = {1: b"Hel", 2: b"lo ", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b" EN", 6: b"D more"}

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    s = TextStream(decode, stops=["END"])
    deltas = [s.push(i) for i in range(1, 7)]
    assert deltas[2] == ("", False)  # half of "é": nothing sent yet
    assert deltas[3][0].endswith("é")
    assert deltas[4] == (" ", False)  # " EN" could start "END": "EN" is held back
    assert deltas[5] == ("", True)
    assert s.text == "Hello é " and "".join(d for d, _ in deltas) + s.finish() == s.text

    plain = TextStream(decode)
    out = "".join(plain.push(i)[0] for i in range(1, 7)) + plain.finish()
    assert out == decode(list(range(1, 7))) == plain.text


def test_text_stream_keeps_context_and_decodes_a_short_window(tmp_path):
    # SentencePiece-style: a word's leading space is dropped at the start of a decode, so a token decoded
    # alone would lose it; the stream's text must still be the decode of every token.
    words = {1: "\u2581Hello", 2: ",", 3: "\u2581world", 4: "\u2581END", 5: "\u2581x"}

    def sp_decode(ids):
        return "".join(words[i] for i in ids).replace("\u2581", " ").lstrip(" ")

    s = TextStream(sp_decode, stops=["END"])
    deltas = [s.push(i)[0] for i in (1, 2, 3, 5, 4, 5)]
    assert s.stopped and s.text == "Hello, world x " and "".join(deltas) + s.finish() == s.text

    # The tiny model's real tokenizer, with multi-byte characters split across tokens: after every token
    # the text equals decoding everything, while each decode sees only a few tokens.
    vlm = build_tiny_vlm(tmp_path)
    text = "Grüße, 世界! " * 30 + "naïve café 🙂 end"
    ids = vlm.tokenizer.encode(text)
    seen: list[int] = []

    def decode(part):
        seen.append(len(part))
        return vlm.decode(part)

    s, out = TextStream(decode), ""
    for k, t in enumerate(ids, 1):
        out += s.push(t)[0]
        assert s.text == vlm.decode(ids[:k])
    assert out + s.finish() == s.text == vlm.decode(ids) == text
    assert len(ids) > 200 and max(seen) <= 8


def test_serve_benchmark_quick_keeps_greedy_answers(capsys):
    from benchmarks import serve as bench

    res = bench.main(["--quick"])
    out = capsys.readouterr().out
    for mode in ("one_at_a_time", "concurrency=1", "concurrency=3"):
        assert f"{mode} " in out and res[mode]["tokens_per_s"] > 0
        assert res[mode]["match"] == 1.0  # batched greedy tokens equal one-at-a-time's
    assert res["concurrency=3"]["max_batch"] > 1
    for mode in ("one_at_a_time", "concurrency=1", "concurrency=3"):  # the latency line of every mode
        assert f"{mode} " in out and f"{mode:<16} ttft_p50_s=" in out
        assert 0 < res[mode]["ttft_p50_s"] <= res[mode]["ttft_p95_s"] and res[mode]["itl_p50_ms"] > 0
    chat = res["chat_3_turns"]
    assert [f"chat_3_turns     turn={t} " in out for t in (1, 2, 3)] == [True] * 3 and "vs_turn_1=" in out
    assert chat["match"] == 1.0  # every turn's tokens equal vlm.generate on the whole prompt
    assert chat["cache"]["prefix_cache"]["hits"] == 2  # turns 2 and 3 started from turn 1's and 2's KV
    b = res["bound"]  # the batching bound at the top concurrency, from the engine's own decode batch
    assert b["rows"] == 3 and "bound rows=3 " in out and "decode_bound=" in out and "run_bound=" in out
    assert b["step_1_s"] > 0 and b["step_rows_s"] > 0 and b["prefill_1_s"] > 0
    assert b["decode_bound"] == pytest.approx(3 * b["step_1_s"] / b["step_rows_s"])
    assert b["prefill_rows_s"] == min(b["prefill_rows_whole_s"], b["prefill_rows_pieces_s"]) > 0  # the faster way


def test_engine_queue_limit_timeout_cancel_and_a_failing_request(tmp_path):
    import time

    from qwenvl_lab.serve.engine import Engine, Job, QueueFull

    vlm = build_tiny_vlm(tmp_path, lm_backend="hf")
    randomize_(vlm, seed=3)
    vlm.eval()
    imgs, msgs = _convs()[0]
    ids, pix = vlm.chat_ids(msgs, len(imgs)), vlm.image_processor(imgs)
    events: dict[int, list] = {}

    def job(i: int, pixels=pix, **kw) -> Job:
        events[i] = []
        return Job(ids, pixels, SamplingParams(max_tokens=kw.pop("max_tokens", 3), ignore_eos=True),
                   emit=lambda kind, data: events[i].append(kind), **kw)

    full = Engine(vlm, max_batch_size=1, max_queue=1)  # never started: nothing leaves the queue
    full.submit(job(9))
    full.submit(job(9))
    with pytest.raises(QueueFull):  # 1 batch slot + 1 waiting
        full.submit(job(9))

    engine = Engine(vlm, max_batch_size=4, max_queue=4)
    late, gone = job(0, deadline=time.monotonic() - 1), job(1, max_tokens=10_000)
    bad = job(2, pixels=torch.zeros(1, 3, 8, 8))  # the tower refuses this size in the prefill
    ok = job(3)
    for j in (late, gone, bad, ok):
        engine.submit(j)
    gone.cancel()
    engine.start()
    try:
        for _ in range(600):
            if ok.finish_reason is not None and bad.finish_reason is not None:
                break
            time.sleep(0.05)
    finally:
        engine.stop()
    assert (late.finish_reason, gone.finish_reason, bad.finish_reason, ok.finish_reason) == (
        "timeout", "cancelled", "error", "length")
    assert events[0] == events[1] == ["done"] and events[2] == ["error"] and events[3][-1] == "done"
    assert len(ok.tokens) == 3 and ok.text == vlm.decode(ok.tokens)
    stats = engine.stats()
    assert (stats["timed_out"], stats["cancelled"], stats["errors"], stats["finished"]) == (1, 1, 1, 1)


def test_a_job_whose_event_loop_has_closed_is_cancelled_not_raised():
    import asyncio
    from types import SimpleNamespace

    from qwenvl_lab.serve.engine import Engine
    from qwenvl_lab.serve.session import submit

    engine = Engine(SimpleNamespace(stop_token_ids=[], parameters=lambda: iter([torch.zeros(1)]),
                                    prepare_attention=lambda: None))  # never started

    async def queue():
        return submit(engine, [1], None, SamplingParams(max_tokens=1), [], 60.0)

    loop = asyncio.new_event_loop()
    job, events = loop.run_until_complete(queue())
    job.emit("delta", "x")  # as the engine thread does
    loop.run_until_complete(asyncio.sleep(0))
    assert events.get_nowait() == ("delta", "x") and not job.cancelled
    loop.close()
    job.emit("delta", "y")  # the engine thread's next event after the server's loop closed
    assert job.cancelled and engine.stats()["waiting"] == 1
