"""The serving engine's caches and chunked prefill (serve/imagecache.py, serve/prefixcache.py, serve/prefill.py),
in process on tiny random VLMs: answers with cache hits are the uncached greedy tokens, a cached image never
reaches the towers, the same text with a different image never hits, both caches evict least recently used
entries under a small budget, and a prompt prefilled in chunks between decode steps gives the tokens of a
whole prefill."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from qwenvl_lab.serve.decode import DecodeBatch, Row, SamplingParams
from qwenvl_lab.serve.imagecache import ImageCache, concat_image_inputs, image_key, split_image_inputs
from qwenvl_lab.serve.prefixcache import PrefixCache, prompt_key

from tests.tiny_model import build_tiny_vlm, randomize_
from tests.tiny_serve import image

N = 6  # new tokens per answer


def tiny(tmp_path, backend: str = "qwen"):
    vlm = build_tiny_vlm(tmp_path, lm_backend=backend)
    randomize_(vlm, seed=3)
    return vlm.eval()


def count_tower_images(vlm) -> list[int]:
    """Images through the towers so far, one entry per tower call (a forward hook)."""
    calls: list[int] = []
    vlm.towers.register_forward_hook(lambda mod, args, out: calls.append(int(args[0].shape[0])))
    return calls


def user(n_images: int, question: str) -> dict:
    return {"role": "user", "content": "<image>" * n_images + ("\n" if n_images else "") + question}


def uncached(vlm, imgs: list, messages: list[dict]) -> list[int]:
    """The greedy tokens of `vlm.generate` on the whole prompt (no cache of any kind)."""
    ids = vlm.chat_ids(messages, len(imgs), vlm.image_tokens(imgs))
    with torch.no_grad():
        return vlm.generate(torch.tensor([ids]), None, **vlm.image_inputs(imgs), max_new_tokens=N,
                            stop_token_ids=[])[0]


def row_of(vlm, imgs: list, messages: list[dict]) -> Row:
    ids = vlm.chat_ids(messages, len(imgs), vlm.image_tokens(imgs))
    return Row(ids, vlm.image_inputs(imgs), SamplingParams(max_tokens=N, ignore_eos=True))


def run(batch: DecodeBatch, rows: list[Row], budget: int | None = None, joins: dict | None = None,
        on_step=None) -> dict:
    """Start `rows` (and `joins[step]` at that decode step), then one prefill piece of `budget` tokens and one
    decode step per iteration until every row has its max_tokens. Returns what happened per step."""
    joins = dict(joins or {})
    batch.start(rows)
    log: dict[str, Any] = {"steps_while_pending": 0}
    step = 0
    while batch.rows or batch.pending or joins:
        if step in joins:
            batch.start(joins.pop(step))
        _, failed = batch.prefill(budget)
        assert not failed, failed
        if batch.pending and batch.rows:
            log["steps_while_pending"] += 1
        if batch.rows:
            tokens = batch.next_tokens()
            for r, t in zip(batch.rows, tokens):
                r.tokens.append(t)
            batch.advance(tokens, [len(r.tokens) < r.params.max_tokens for r in batch.rows])
            if on_step is not None:
                on_step(batch)
        step += 1
    return log


@pytest.fixture(scope="module")
def by_backend(tmp_path_factory):
    """One tiny VLM per LM backend for the module, built on first use."""
    built: dict[str, Any] = {}

    def get(backend: str):
        if backend not in built:
            built[backend] = tiny(tmp_path_factory.mktemp(f"serve_cache_{backend}"), backend)
        return built[backend]

    return get


@pytest.fixture(scope="module")
def vlm(by_backend):
    return by_backend("qwen")


def test_image_cache_hits_skip_the_towers_and_keep_answers(vlm):
    calls = count_tower_images(vlm)
    cache = ImageCache(64 << 20)
    q1, q2 = [user(1, "what is it?")], [user(1, "and the colour, please?")]
    want = {(0, "q1"): uncached(vlm, [image(0)], q1), (0, "q2"): uncached(vlm, [image(0)], q2),
            (1, "q2"): uncached(vlm, [image(1)], q2)}
    calls.clear()

    first = row_of(vlm, [image(0)], q1)
    run(DecodeBatch(vlm, image_cache=cache), [first])
    assert first.tokens == want[(0, "q1")] and calls == [1] and cache.stats()["misses"] == 1

    again = row_of(vlm, [image(0)], q2)  # the same picture (decoded again, from a new PIL image): no tower call
    run(DecodeBatch(vlm, image_cache=cache), [again])
    assert again.tokens == want[(0, "q2")]
    assert calls == [1] and cache.stats()["hits"] == 1

    other = row_of(vlm, [image(1)], q2)  # the same text with a different picture: a miss, the towers run
    run(DecodeBatch(vlm, image_cache=cache), [other])
    assert other.tokens == want[(1, "q2")] and calls == [1, 1]
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 2

    # Two rows with the same image in one prefill: encoded once, both answers right.
    calls.clear()
    pair = [row_of(vlm, [image(2)], q1), row_of(vlm, [image(2)], q2)]
    run(DecodeBatch(vlm, image_cache=ImageCache(64 << 20)), pair)
    assert calls == [1] and [r.tokens for r in pair] == [uncached(vlm, [image(2)], q1), uncached(vlm, [image(2)], q2)]


def test_image_cache_evicts_least_recently_used_under_a_small_budget(vlm):
    calls = count_tower_images(vlm)
    one = vlm.tokens_per_image * vlm.lm.get_input_embeddings().weight.shape[1] * 4  # fp32 rows of one image
    cache = ImageCache(int(one * 2.5))  # room for two images
    q = [user(1, "what is it?")]
    for i in (0, 1, 0, 2, 1):  # 0 is used again before 2 arrives: 1 is the least recently used, evicted
        run(DecodeBatch(vlm, image_cache=cache), [row_of(vlm, [image(i)], q)])
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["entries"]) == (1, 4, 2, 2)
    assert s["bytes"] == 2 * one <= s["max_bytes"]
    assert len(calls) == 4  # image 1's second request ran the towers again


def test_image_keys_follow_content_and_resolution(vlm, tmp_path):
    a, b = vlm.image_inputs([image(0)]), vlm.image_inputs([image(1)])
    assert image_key(a) == image_key(vlm.image_inputs([image(0)])) != image_key(b)
    two = vlm.image_inputs([image(0), image(1)])
    parts = split_image_inputs(two)
    assert [image_key(p) for p in parts] == [image_key(a), image_key(b)]
    assert torch.equal(concat_image_inputs(parts)["pixel_values"], two["pixel_values"])
    # Anyres: the crops and sizes are part of each image's inputs, so the key holds the resolution settings.
    anyres = build_tiny_vlm(tmp_path, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    big, wide = image(0, (64, 48)), image(0, (90, 30))
    inputs = anyres.image_inputs([big, wide])
    parts = split_image_inputs(inputs)
    assert [int(p["image_crops"][0]) for p in parts] == inputs["image_crops"].tolist()
    assert [p["pixel_values"].shape[0] for p in parts] == inputs["image_crops"].tolist()
    assert image_key(parts[0]) == image_key(split_image_inputs(anyres.image_inputs([big, image(5, (90, 30))]))[0])
    assert image_key(parts[0]) != image_key(parts[1])
    # Alone, the same picture may get another layout (anyres's multi-image policy): the key follows the inputs.
    single = anyres.image_inputs([big])
    same_inputs = all(torch.equal(single[k], parts[0][k]) for k in single)
    assert (image_key(single) == image_key(parts[0])) == same_inputs
    assert image_key(anyres.image_inputs([image(0)])) != image_key(vlm.image_inputs([image(0)]))


def test_prompt_keys_tell_images_apart():
    ph = 99
    ids = [1, 2, ph, ph, ph, 3]
    same = prompt_key(ids, ph, ["ab" * 20], [3])
    assert torch.equal(same, prompt_key(ids, ph, ["ab" * 20], [3]))
    other = prompt_key(ids, ph, ["cd" * 20], [3])
    assert torch.equal(same[:2], other[:2]) and not (same[2:5] == other[2:5]).any()
    assert (same[2:5] < 0).all() and same[5] == 3
    with pytest.raises(ValueError, match="placeholders"):
        prompt_key(ids, ph, ["ab" * 20], [2])


@pytest.mark.parametrize("backend", ["qwen", "hf"])
def test_a_three_turn_chat_reuses_its_prefix_and_answers_as_uncached(by_backend, backend):
    vlm = by_backend(backend)
    calls = count_tower_images(vlm)
    images, prefix = ImageCache(64 << 20), PrefixCache(64 << 20)
    msgs = [user(1, "what is it?")]
    cached, prompts = [], []
    for turn, question in enumerate(["what is it?", "and its colour?", "anything else?"]):
        if turn:
            msgs = msgs + [user(0, question)]
        want = uncached(vlm, [image(0)], msgs)
        calls.clear()
        row = row_of(vlm, [image(0)], msgs)
        run(DecodeBatch(vlm, image_cache=images, prefix_cache=prefix), [row])
        assert row.tokens == want, f"turn {turn + 1}"
        cached.append(row.cached_tokens)
        prompts.append(len(row.prompt_ids))
        assert calls == ([1] if turn == 0 else [])  # later turns: the image's span is in the cached prefix
        msgs = msgs + [{"role": "assistant", "content": vlm.decode(row.tokens)}]
    assert cached[0] == 0
    # Turns 2 and 3 reuse at least the whole previous prompt (the answer too, where it re-tokenises the same).
    assert cached[1] >= prompts[0] and cached[2] >= prompts[1]
    s = prefix.stats()
    assert (s["hits"], s["misses"], s["cached_tokens"]) == (2, 1, cached[1] + cached[2])
    assert s["entries"] <= 3 and s["bytes"] <= s["max_bytes"]


def test_prefix_cache_keeps_the_longest_entry_of_a_chat():
    cache = PrefixCache(1000)
    key = torch.arange(10)
    cache.insert(key[:4], "turn 1", n_bytes=40)
    cache.insert(key[:7], "turn 2", n_bytes=70)  # turn 1's entry is its prefix: dropped
    assert [e.cache for e in cache.entries.values()] == ["turn 2"] and cache.bytes == 70
    cache.insert(key[:5], "shorter", n_bytes=50)  # a prefix of an entry: nothing new
    assert [e.cache for e in cache.entries.values()] == ["turn 2"]
    entry, n = cache.lookup(torch.cat([key[:6], torch.tensor([99])]))
    assert entry.cache == "turn 2" and n == 6
    assert cache.lookup(torch.tensor([5, 6])) == (None, 0)
    cache.insert(torch.tensor([7, 7]), "other", n_bytes=20)
    cache.insert(torch.tensor([8, 8]), "too big", n_bytes=2000)  # over the whole budget: not kept
    assert sorted(e.cache for e in cache.entries.values()) == ["other", "turn 2"] and cache.bytes == 90


def test_the_same_text_with_another_image_reuses_only_the_text_before_it(vlm):
    prefix = PrefixCache(64 << 20, min_tokens=1)
    q = [user(1, "what is it?")]
    first = row_of(vlm, [image(0)], q)
    run(DecodeBatch(vlm, prefix_cache=prefix), [first])
    other = row_of(vlm, [image(1)], q)
    assert other.prompt_ids == first.prompt_ids  # placeholder ids are the same for every image
    run(DecodeBatch(vlm, prefix_cache=prefix), [other])
    assert other.cached_tokens == other.prompt_ids.index(vlm.image_token_id)  # up to the first placeholder
    assert other.tokens == uncached(vlm, [image(1)], q)
    again = row_of(vlm, [image(0)], q)  # the same image and text: all but the last prompt token
    run(DecodeBatch(vlm, prefix_cache=prefix), [again])
    assert again.cached_tokens == len(again.prompt_ids) - 1 and again.tokens == first.tokens


def test_prefix_cache_evicts_least_recently_used_under_a_small_budget(vlm):
    q = [user(1, "what is it?")]
    probe = PrefixCache(64 << 20, min_tokens=1)
    run(DecodeBatch(vlm, prefix_cache=probe), [row_of(vlm, [image(0)], q)])
    one = probe.stats()["bytes"]  # one finished request: prompt + fed tokens
    prefix = PrefixCache(int(one * 1.5), min_tokens=1)  # room for one such entry
    for i in (0, 1):
        run(DecodeBatch(vlm, prefix_cache=prefix), [row_of(vlm, [image(i)], q)])
    s = prefix.stats()
    assert (s["entries"], s["evictions"]) == (1, 1) and s["bytes"] <= s["max_bytes"]
    back = row_of(vlm, [image(0)], q)  # image 0's entry was evicted: only the text before the image matches
    run(DecodeBatch(vlm, prefix_cache=prefix), [back])
    assert back.cached_tokens == back.prompt_ids.index(vlm.image_token_id)
    assert back.tokens == uncached(vlm, [image(0)], q)


@pytest.mark.parametrize("backend", ["qwen", "hf"])
def test_chunked_prefill_interleaves_with_decode_and_gives_whole_prefill_tokens(by_backend, backend):
    vlm = by_backend(backend)
    short = ([image(0)], [user(1, "hi?")])
    long = ([image(1), image(2)], [user(2, "a much longer question " * 6 + "about both pictures?")])
    want = [uncached(vlm, *short), uncached(vlm, *long)]
    rows = [row_of(vlm, *short), row_of(vlm, *long)]
    budget = 7  # smaller than an image span: chunks start and end inside spans
    assert budget < vlm.tokens_per_image and len(rows[1].prompt_ids) > 4 * budget
    log = run(DecodeBatch(vlm, image_cache=ImageCache(64 << 20)), [rows[0]], budget=budget, joins={1: [rows[1]]})
    assert [r.tokens for r in rows] == want
    assert log["steps_while_pending"] >= 3  # the short row decoded while the long prompt was prefilled


# ----- the API in process: cached_tokens and /metrics ----------------------------------------------------
METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{le="([^"]+)"\})? (\S+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name (with its le label): value}, checking the format as it goes: every
    sample belongs to a family declared by HELP and TYPE lines before it, buckets are cumulative and the
    +Inf bucket equals the count."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types
            types[name] = kind
            continue
        m = METRIC_LINE.match(line)
        assert m, line
        name, _, le, value = m.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name}: no TYPE line before it"
        out[name + (f'{{le="{le}"}}' if le else "")] = float(value)
    for name, kind in types.items():
        if kind == "histogram":
            buckets = [v for k, v in out.items() if k.startswith(name + "_bucket")]
            assert buckets == sorted(buckets) and buckets[-1] == out[name + "_count"]
    return out


def test_api_reports_cached_tokens_and_metrics_move(vlm):
    pytest.importorskip("fastapi", reason="the server needs fastapi (pip install .[serve])")
    from fastapi.testclient import TestClient
    from qwenvl_lab.serve.app import create_app
    from qwenvl_lab.serve.engine import Engine
    from qwenvl_lab.serve.protocol import Limits

    from tests.tiny_serve import data_url

    engine = Engine(vlm, max_batch_size=4, max_queue=4)
    client = TestClient(create_app(vlm, engine, "m", Limits()))
    pic = {"type": "image_url", "image_url": {"url": data_url(image(0))}}
    turn1 = [{"role": "user", "content": [pic, {"type": "text", "text": "what is it?"}]}]

    def ask(messages: list[dict]) -> dict:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "temperature": 0,
                                                       "max_tokens": N, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()

    engine.start()
    try:
        with client:
            before = parse_metrics(client.get("/metrics").text)
            a1 = ask(turn1)
            turn2 = turn1 + [{"role": "assistant", "content": a1["choices"][0]["message"]["content"]},
                             {"role": "user", "content": "and its colour?"}]
            a2 = ask(turn2)
            # Text before the image: the prefix differs before the image's span, so the image is looked up.
            other = ask([{"role": "user", "content": [{"type": "text", "text": "Look at this."}, pic]}])
            metrics = client.get("/metrics")
    finally:
        engine.stop()
    assert metrics.headers["content-type"].startswith("text/plain")
    after = parse_metrics(metrics.text)
    u1, u2, u3 = (a["usage"] for a in (a1, a2, other))
    assert u1["prompt_tokens_details"]["cached_tokens"] == 0
    assert u2["prompt_tokens_details"]["cached_tokens"] >= u1["prompt_tokens"]  # turn 1's prompt at least
    # Only the template's first few tokens match: below the engine's min_tokens, so nothing is reused.
    assert u3["prompt_tokens_details"]["cached_tokens"] == 0
    msgs2 = [user(1, "what is it?"), {"role": "assistant", "content": a1["choices"][0]["message"]["content"]},
             user(0, "and its colour?")]
    assert a2["choices"][0]["message"]["content"] == vlm.decode(uncached(vlm, [image(0)], msgs2))

    p = "qwenvl_serve_"
    assert all(v == 0 for k, v in before.items() if k.endswith(("_total", "_count")))
    moved = {k: after[p + k] - before[p + k] for k in (
        "image_cache_hits_total", "image_cache_misses_total", "prefix_cache_hits_total",
        "prefix_cache_misses_total", "generated_tokens_total", "requests_finished_total",
        "time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "prefix_cache_cached_tokens_total")}
    # Turn 2's image lies in its cached prefix (not even looked up); the third request's is an image-cache hit.
    assert moved == {"image_cache_hits_total": 1, "image_cache_misses_total": 1, "prefix_cache_hits_total": 1,
                     "prefix_cache_misses_total": 2, "generated_tokens_total": 3 * N, "requests_finished_total": 3,
                     "time_to_first_token_seconds_count": 3, "inter_token_latency_seconds_count": 3 * (N - 1),
                     "prefix_cache_cached_tokens_total": sum(u["prompt_tokens_details"]["cached_tokens"]
                                                             for u in (u2, u3))}
    assert after[p + "image_cache_bytes"] > 0 and after[p + "prefix_cache_bytes"] > 0
    assert after[p + "time_to_first_token_seconds_sum"] > 0


def test_engine_prefills_a_long_prompt_in_chunks_while_another_request_decodes(vlm):
    import time

    from qwenvl_lab.serve.engine import Engine, Job

    short = ([image(0)], [user(1, "hi?")])
    long = ([image(1), image(2)], [user(2, "a much longer question " * 6 + "about both pictures?")])
    want_long = uncached(vlm, *long)
    engine = Engine(vlm, max_batch_size=4, max_queue=4, prefill_chunk=7)

    def job(imgs, msgs, n):
        ids = vlm.chat_ids(msgs, len(imgs), vlm.image_tokens(imgs))
        return Job(ids, vlm.image_inputs(imgs), SamplingParams(max_tokens=n, ignore_eos=True), emit=lambda k, d: None)

    first, second = job(*short, 120), job(*long, N)  # 120 steps: far more than the ~20 chunks
    engine.start()
    try:
        engine.submit(first)
        deadline = time.monotonic() + 120
        while not first.tokens and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.submit(second)  # arrives while the first decodes: its prompt is prefilled 7 tokens at a time
        while (first.finish_reason is None or second.finish_reason is None) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.stop()
    assert (first.finish_reason, second.finish_reason) == ("length", "length")
    assert second.tokens == want_long
    with torch.no_grad():
        ids = vlm.chat_ids(short[1], 1)
        assert first.tokens == vlm.generate(torch.tensor([ids]), None, **vlm.image_inputs(short[0]),
                                            max_new_tokens=120, stop_token_ids=[])[0]
    assert engine.stats()["max_batch"] == 2 and engine.stats()["errors"] == 0


@pytest.mark.parametrize("mode", ["anyres", "native"])
def test_variable_resolution_chats_chunked_and_prefix_cached_equal_uncached(tmp_path, mode):
    from tests.test_variable_serving import variable_vlm

    vlm = variable_vlm(tmp_path, mode)
    imgs = [image(0, (64, 48)), image(1, (20, 70))]  # spans of different lengths
    batch = DecodeBatch(vlm, image_cache=ImageCache(64 << 20), prefix_cache=PrefixCache(64 << 20, min_tokens=1))
    msgs = [user(2, "what are they?")]
    for turn in range(2):
        row = row_of(vlm, imgs, msgs)
        run(batch, [row], budget=5)  # chunks cut through every span
        assert row.tokens == uncached(vlm, imgs, msgs), f"turn {turn + 1}"
        assert (row.cached_tokens > 0) == (turn > 0)
        msgs = msgs + [{"role": "assistant", "content": vlm.decode(row.tokens)}, user(0, "which is bigger?")]
    other = row_of(vlm, imgs[::-1], [user(2, "what are they?")])  # the same text, the images swapped
    run(batch, [other], budget=5)
    assert other.cached_tokens == other.prompt_ids.index(vlm.image_token_id)
    assert other.tokens == uncached(vlm, imgs[::-1], [user(2, "what are they?")])


def test_decode_steps_use_the_static_cache_and_screened_head_as_generate_does(tmp_path):
    vlm = build_tiny_vlm(tmp_path, dtype="float32")  # an fp32 head on a CPU: generate screens its argmax
    randomize_(vlm, seed=3)
    vlm.eval()
    batch = DecodeBatch(vlm, image_cache=ImageCache(64 << 20), prefix_cache=PrefixCache(64 << 20))
    if batch.screen is None:
        pytest.skip("no fbgemm fp16 kernels in this torch build: generate does not screen either")
    assert batch.static
    convs = [([image(i)], [user(1, "what" + " is it" * i + "?")]) for i in range(3)]
    want = [uncached(vlm, imgs, m) for imgs, m in convs]
    rows = [row_of(vlm, imgs, m) for imgs, m in convs]
    rows[1].params.max_tokens = 3  # leaves early: rows are selected, the buffer is rebuilt, decoding goes on
    seen_static = []

    def on_step(batch: DecodeBatch) -> None:
        keys = batch.cache.keys[0] if batch.cache is not None else None
        if keys is not None:  # a view of a preallocated buffer: its storage holds more positions than are filled
            seen_static.append(keys.untyped_storage().nbytes() > keys.numel() * keys.element_size())

    run(batch, rows[:2], joins={2: [rows[2]]}, on_step=on_step)
    assert [r.tokens for r in rows] == [want[0], want[1][:3], want[2]]
    assert len(seen_static) >= N and all(seen_static)  # every decode step ran on the static buffer
    sampled = [Row(rows[0].prompt_ids, rows[0].images, SamplingParams(max_tokens=N, temperature=1.0, seed=7))
               for _ in range(2)]
    for r in sampled:
        run(DecodeBatch(vlm), [r])
    assert sampled[0].tokens == sampled[1].tokens and len(sampled[0].tokens) == N  # sampling reads the logits


def test_engine_chooses_its_batch_screen_at_start(tmp_path):
    """An engine that can batch more than SMALL_ROWS rows times its batch screen when it is built, not in
    its first busy moment; one that cannot leaves it unchosen (no copy of the head for it)."""
    from qwenvl_lab.qwen.generation import ScreenedHead
    from qwenvl_lab.serve.engine import Engine

    vlm = build_tiny_vlm(tmp_path, dtype="float32")
    randomize_(vlm, seed=3)
    small = Engine(vlm, max_batch_size=ScreenedHead.SMALL_ROWS)
    if small.batch.screen is None:
        pytest.skip("no screened head in this torch build")
    assert small.batch.screen.large is None
    Engine(vlm, max_batch_size=ScreenedHead.SMALL_ROWS + 1)
    assert small.batch.screen.large in ScreenedHead.available()  # the same head's screen, now chosen


def test_qwen1_dynamic_ntk_prompts_past_seq_length_are_prefilled_whole(tmp_path):
    import json

    from tests.tiny_model import tiny_lm_dir

    lm = tiny_lm_dir(tmp_path, "qwen1")
    cfg = json.loads((lm / "config.json").read_text())
    short_len = len(build_tiny_vlm(tmp_path, lm_arch="qwen1").chat_ids([user(1, "hi?")], 1))
    cfg.update(use_dynamic_ntk=True, use_logn_attn=True, seq_length=short_len + 4)  # NTK alpha > 1 past it
    (lm / "config.json").write_text(json.dumps(cfg))
    vlm = build_tiny_vlm(tmp_path, lm_arch="qwen1")
    randomize_(vlm, seed=3)
    vlm.eval()
    short = ([image(0)], [user(1, "hi?")])
    long = ([image(1)], [user(1, "a longer question " * 4 + "past the rotary threshold?")])
    batch = DecodeBatch(vlm, prefix_cache=PrefixCache(64 << 20, min_tokens=1))
    rows = [row_of(vlm, *short), row_of(vlm, *long)]
    run(batch, rows, budget=5)
    assert (rows[0].pieces, rows[1].pieces) == (True, False)  # the long prompt's alpha depends on its length
    assert [r.tokens for r in rows] == [uncached(vlm, *short), uncached(vlm, *long)]
    again = [row_of(vlm, *short), row_of(vlm, *long)]
    run(batch, again, budget=5)
    assert again[0].cached_tokens == len(again[0].prompt_ids) - 1 and again[1].cached_tokens == 0
    assert [r.tokens for r in again] == [r.tokens for r in rows]
