"""Variable tokens per image through the data path: header sizes (EXIF), the counts of `Resolution.layout`
in rendering, validation and items, budgets (downscale / skip), truncation and packing with spans of
different lengths, the collators' per-image keys, the feature cache refusal, trainer/run.py's datasets.

The real anyres / native pixel functions arrive with visual/'s own work: items here go through
`visual.pixels.prepare_images` with a stand-in pixel function registered in `PIXEL_FNS` (monkeypatch) that
returns correctly shaped rows and writes the image's width into them (to see the size it was given).
"""

import random
import struct
from types import SimpleNamespace

import pytest
import tiny_data as td
import torch
from PIL import Image, ImageFile
from qwenvl_lab.core.errors import UserError
from qwenvl_lab.dataset import Collator, VLMDataset
from qwenvl_lab.dataset.collator import IMAGE_KEYS
from qwenvl_lab.dataset.images import image_size, load_image, load_video_frames, video_frame_size
from qwenvl_lab.dataset.layouts import plan_sample, sample_image_budget
from qwenvl_lab.dataset.packing import PackingCollator, PackingSampler
from qwenvl_lab.dataset.rendering import ChatFormat, render
from qwenvl_lab.dataset.sample import Sample
from qwenvl_lab.visual import pixels
from qwenvl_lab.visual.resolution import Resolution

ANYRES = Resolution(mode="anyres", image_size=32, grid=(8, 8), tokens_per_crop=64,
                    pinpoints=((32, 64), (64, 32), (64, 64)))
NAFLEX = Resolution(mode="naflex", patch_size=8, max_num_patches=16)  # fills its patches: size-blind counts
NATIVE = Resolution(mode="native", patch_size=4, merge=2, min_pixels=64, max_pixels=64 * 64)  # counts follow size
FIXED_TOKENS = 4


def fake_pixels(img, res, processor, n):
    """Rows of the right shape for `res`; every value is the image's width (so a test sees its size)."""
    lay = res.layout(*img.size, n)
    if res.mode == "anyres":
        return torch.full((lay.crops, 3, res.image_size, res.image_size), float(img.size[0]))
    p = res.patch_size
    return torch.full((lay.grid[0] * lay.grid[1], 3, p, p), float(img.size[0]))


@pytest.fixture
def fake_pixel_fns(monkeypatch):
    monkeypatch.setitem(pixels.PIXEL_FNS, "anyres", fake_pixels)
    monkeypatch.setitem(pixels.PIXEL_FNS, "naflex", fake_pixels)
    monkeypatch.setitem(pixels.PIXEL_FNS, "native", fake_pixels)


@pytest.fixture
def tok(tmp_path):
    return td.tiny_tokenizer(tmp_path / "tok")


def _ds(path, tok, res, folder, **kw):
    return VLMDataset(path, tok, td.tiny_processor(), FIXED_TOKENS, image_folder=str(folder), resolution=res,
                      prepare_images=pixels.prepare_images, **kw)


def _spans(ids: list[int], fmt: ChatFormat) -> list[int]:
    """Placeholder count of each image span in `ids`; asserts every span is start + N x pad + end."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == fmt.image_start_id:
            j = i + 1
            while j < len(ids) and ids[j] == fmt.image_token_id:
                j += 1
            assert j < len(ids) and ids[j] == fmt.image_end_id, f"span at {i} not closed: {ids[i:j + 1]}"
            out.append(j - i - 1)
            i = j + 1
        else:
            assert ids[i] not in (fmt.image_token_id, fmt.image_end_id), f"placeholder outside a span at {i}"
            i += 1
    return out


def _random_images(folder, rng, n, lo=4, hi=90):
    names = []
    for k in range(n):
        name = f"img{rng.random():.9f}_{k}.png"
        td.write_rgb(folder / name, size=(rng.randint(lo, hi), rng.randint(lo, hi)))
        names.append(name)
    return names


# ------------------------------------------------------------------------------------- header sizes
def _png_with_exif_after_data(path, size, orientation):
    """A PNG whose eXIf chunk sits after the image data (allowed by the PNG extensions); chunks move whole,
    so every CRC stays valid."""
    td.write_exif_rotated(path, size=size, orientation=orientation)
    data = path.read_bytes()
    chunks, i = [], 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        chunks.append(data[i:i + 12 + length])
        i += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert exif and rest[-1][4:8] == b"IEND"
    path.write_bytes(data[:8] + b"".join(rest[:-1]) + exif[0] + rest[-1])
    return path


def test_image_size_is_the_loaded_size_exif_applied_without_decoding(tmp_path, monkeypatch):
    files = {"jpeg6": td.write_exif_rotated(tmp_path / "a.jpg"),
             "png8": td.write_exif_rotated(tmp_path / "b.png", size=(10, 4), orientation=8),
             "png3": td.write_exif_rotated(tmp_path / "c.png", size=(10, 4), orientation=3),
             "plain": td.write_rgb(tmp_path / "d.png", size=(7, 3)),
             "png_tail": _png_with_exif_after_data(tmp_path / "e.png", (12, 5), 6)}
    expected = {"jpeg6": (2, 6), "png8": (4, 10), "png3": (10, 4), "plain": (7, 3), "png_tail": (5, 12)}
    for name, path in files.items():
        assert image_size(path) == load_image(path).size == expected[name], name
    # No pixel decoded for the usual files: the header answers (a trailing eXIf is the documented exception).
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    for name in ("jpeg6", "png8", "png3", "plain"):
        assert image_size(files[name]) == expected[name]


def test_video_frame_size_from_the_header(tmp_path):
    pytest.importorskip("av")
    path = td.write_video(tmp_path / "v.mp4", n_frames=3, size=(48, 32))
    assert video_frame_size(path) == (48, 32) == load_video_frames(path, 1)[0].size


# ------------------------------------------------------------------------- lengths, items, collator
@pytest.mark.parametrize("res", [ANYRES, NAFLEX], ids=["anyres", "naflex"])
def test_validated_lengths_equal_built_lengths_with_random_sizes(tmp_path, tok, res, fake_pixel_fns,
                                                                 monkeypatch):
    rng = random.Random(0)
    recs = []
    for i in range(12):
        names = _random_images(tmp_path, rng, rng.randint(0, 3))
        text = " ".join("<image>" for _ in names) + " what?" * rng.randint(1, 4)
        recs.append({"id": f"s{i}", "images": names, "messages": [
            {"role": "user", "content": text}, {"role": "assistant", "content": "ok " * rng.randint(1, 5)}]})
    ds = _ds(td.write_jsonl(tmp_path / "d.jsonl", recs), tok, res, tmp_path)
    with monkeypatch.context() as m:  # validation reads headers only
        m.setattr("qwenvl_lab.dataset.dataset.load_image", lambda *a, **k: pytest.fail("decoded in validate"))
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded in validate"))
        ds.validate()
    assert len(ds) == 12
    lengths, image_tokens = ds.lengths, ds.image_tokens
    fmt = ChatFormat.for_qwen(tok)
    for pos, k in enumerate(ds.index):
        s, item = ds.samples[k], ds[pos]
        assert len(item["input_ids"]) == lengths[pos]
        n = len(s.images)
        want = [res.layout(*Image.open(p).size, n).tokens for p in s.images]
        assert _spans(item["input_ids"].tolist(), fmt) == want and image_tokens[pos] == sum(want)
        assert item["n_images"] == n
        if n:
            assert item["image_sizes"].tolist() == [[Image.open(p).size[1], Image.open(p).size[0]] for p in s.images]
            per_image = "image_crops" if res.mode == "anyres" else "image_grid"
            assert item[per_image].shape[0] == n
        else:
            assert item["pixel_values"] is None and "image_sizes" not in item


def test_exif_rotated_image_counts_from_its_displayed_size(tmp_path, tok, fake_pixel_fns):
    td.write_exif_rotated(tmp_path / "rot.jpg", size=(64, 16), orientation=6)  # displayed 16 wide, 64 high
    rec = {"id": "r", "images": ["rot.jpg"], "messages": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "tall"}]}
    ds = _ds(td.write_jsonl(tmp_path / "d.jsonl", [rec]), tok, NAFLEX, tmp_path)
    ds.validate()
    item = ds[0]
    assert NAFLEX.layout(16, 64) != NAFLEX.layout(64, 16)  # the test can tell the two apart
    assert item["image_grid"].tolist() == [list(NAFLEX.layout(16, 64).grid)]
    assert _spans(item["input_ids"].tolist(), ChatFormat.for_qwen(tok)) == [NAFLEX.layout(16, 64).tokens]
    assert len(item["input_ids"]) == ds.lengths[0]


def test_video_frames_count_from_the_frame_size(tmp_path, tok, fake_pixel_fns):
    pytest.importorskip("av")
    td.write_video(tmp_path / "v.mp4", n_frames=4, size=(48, 32))
    td.write_rgb(tmp_path / "a.png", size=(20, 16))
    rec = {"id": "v", "images": ["a.png"], "videos": ["v.mp4"], "messages": [
        {"role": "user", "content": "<image> then <video>"}, {"role": "assistant", "content": "moving"}]}
    ds = VLMDataset(td.write_jsonl(tmp_path / "d.jsonl", [rec]), tok, td.tiny_processor(), FIXED_TOKENS,
                    image_folder=str(tmp_path), video_folder=str(tmp_path), frames_per_video=2,
                    resolution=NATIVE, prepare_images=pixels.prepare_images)
    ds.validate()
    item = ds[0]
    n = 3  # one image and two frames: the n_images of every layout
    want = [NATIVE.tokens(20, 16, n)] + [NATIVE.tokens(48, 32, n)] * 2
    assert _spans(item["input_ids"].tolist(), ChatFormat.for_qwen(tok)) == want
    assert item["n_images"] == 3 and item["image_sizes"].tolist() == [[16, 20], [32, 48], [32, 48]]
    assert len(item["input_ids"]) == ds.lengths[0] and ds.image_tokens == [sum(want)]


def test_collators_concatenate_per_image_keys_in_sample_order(tmp_path, tok, fake_pixel_fns):
    for name, size in (("w.png", (64, 32)), ("t.png", (32, 64)), ("s.png", (20, 20))):
        td.write_rgb(tmp_path / name, size=size)
    recs = [
        {"id": "a", "images": ["w.png"], "messages": [{"role": "user", "content": "<image>"},
                                                      {"role": "assistant", "content": "a"}]},
        td.simple_record(1, image=None),
        {"id": "b", "images": ["t.png", "s.png"], "messages": [{"role": "user", "content": "<image><image>"},
                                                               {"role": "assistant", "content": "b"}]},
    ]
    ds = _ds(td.write_jsonl(tmp_path / "d.jsonl", recs), tok, ANYRES, tmp_path)
    items = [ds[i] for i in range(3)]
    batch = Collator(pad_id=0)(items)
    assert batch["image_counts"].tolist() == [1, 0, 2]  # images per sample, not crops
    assert batch["image_sizes"].tolist() == [[32, 64], [64, 32], [20, 20]]
    # sample b has two images: anyres' multi-image policy gives each the base view only
    assert batch["image_crops"].tolist() == [3, 1, 1] and "image_grid" not in batch
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [64.0] * 3 + [32.0, 20.0]  # item order kept
    packed = PackingCollator()([items])
    for key in ("pixel_values", "image_sizes", "image_crops"):
        assert torch.equal(packed[key], batch[key]), key
    assert packed["image_counts"].tolist() == [3] and packed.sample_image_counts == [1, 0, 2]


@pytest.mark.skipif("native" not in pixels.PIXEL_FNS, reason="visual/'s native pixel function not merged")
def test_real_native_pixels_through_the_dataset_budget_and_collator(tmp_path, tok):
    from qwenvl_lab.visual.processor import ImageProcessor

    path = _two_big_images(tmp_path, tok)
    proc = ImageProcessor(size=8, mean=[0.5] * 3, std=[0.5] * 3)
    ds = VLMDataset(path, tok, proc, FIXED_TOKENS, image_folder=str(tmp_path), resolution=NATIVE,
                    prepare_images=pixels.prepare_images, max_image_tokens=40)
    rep = ds.validate()
    assert rep["downscaled_samples"] == 1 and rep["skipped"] == 0
    items = [ds[0], ds[1]]
    batch = Collator(pad_id=0)(items)
    grids = batch["image_grid"].tolist()
    p = NATIVE.patch_size
    assert batch["pixel_values"].shape == (sum(r * c for r, c in grids), 3, p, p)
    assert batch["image_counts"].tolist() == [2, 1] and len(grids) == 3
    placeholders = [_spans(it["input_ids"].tolist(), ChatFormat.for_qwen(tok)) for it in items]
    assert [t for spans in placeholders for t in spans] == [r * c // NATIVE.merge**2 for r, c in grids]
    assert sum(placeholders[0]) <= 40 and [len(it["input_ids"]) for it in items] == ds.lengths


def test_collator_keys_are_the_pixel_side_keys():
    assert IMAGE_KEYS == pixels.META_KEYS


def test_fixed_mode_is_unchanged_with_a_fixed_resolution(tmp_path, tok):
    td.write_rgb(tmp_path / "a.png", size=(50, 20))
    path = td.write_jsonl(tmp_path / "d.jsonl", [td.simple_record(0)])
    fixed = Resolution(mode="fixed", image_size=8, grid=(2, 2), tokens_per_crop=FIXED_TOKENS)
    a, b = _ds(path, tok, fixed, tmp_path), _ds(path, tok, None, tmp_path)
    ia, ib = a[0], b[0]
    assert sorted(ia) == sorted(ib) and "image_sizes" not in ia
    assert all(torch.equal(ia[k], ib[k]) for k in ("input_ids", "labels", "pixel_values"))
    assert ia["pixel_values"].shape == (1, 3, 8, 8)


# ------------------------------------------------------------------------------------------ budgets
def _two_big_images(tmp_path, tok, **kw):
    td.write_rgb(tmp_path / "big1.png", size=(80, 64))
    td.write_rgb(tmp_path / "big2.png", size=(64, 64))
    rec = {"id": "big", "images": ["big1.png", "big2.png"], "messages": [
        {"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "two"}]}
    small = {"id": "small", "images": ["small.png"], "messages": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "one"}]}
    td.write_rgb(tmp_path / "small.png", size=(8, 8))
    return td.write_jsonl(tmp_path / "d.jsonl", [rec, small])


def test_over_budget_downscale_shrinks_every_image_and_counts_it(tmp_path, tok, fake_pixel_fns):
    full = NATIVE.tokens(80, 64) + NATIVE.tokens(64, 64)
    assert full == 120
    ds = _ds(_two_big_images(tmp_path, tok), tok, NATIVE, tmp_path, max_image_tokens=40)
    rep = ds.validate()
    assert rep["skipped"] == 0 and rep["downscaled_samples"] == 1
    rec = rep["downscaled_examples"][0]
    assert rec["id"] == "big" and rec["tokens_before"] == full and rec["tokens_after"] <= 40 and rec["factor"] < 1
    item = ds[0]
    spans = _spans(item["input_ids"].tolist(), ChatFormat.for_qwen(tok))
    assert sum(spans) == rec["tokens_after"] and len(item["input_ids"]) == ds.lengths[0]
    # the pixels got the downscaled sizes (one common factor), the sizes the counts came from
    (h1, w1), (h2, w2) = item["image_sizes"].tolist()
    assert w1 < 80 and w2 < 64 and abs(w1 / 80 - w2 / 64) < 0.05
    assert [NATIVE.tokens(w1, h1), NATIVE.tokens(w2, h2)] == spans
    assert item["pixel_values"][0, 0, 0, 0] == w1
    assert ds[1]["n_images"] == 1 and "small" not in str(rep["downscaled_examples"])


def test_over_budget_skip_is_counted_never_raised(tmp_path, tok, fake_pixel_fns):
    ds = _ds(_two_big_images(tmp_path, tok), tok, NATIVE, tmp_path, max_image_tokens=40, over_budget="skip")
    rep = ds.validate()
    assert rep["by_kind"] == {"image_budget": 1} and rep["downscaled_samples"] == 0 and len(ds) == 1
    assert "max_image_tokens" in rep["examples"][0] and "big" in rep["examples"][0]
    # without validate(), __getitem__ skips it too and moves on to the next sample
    ds2 = _ds(_two_big_images(tmp_path, tok), tok, NATIVE, tmp_path, max_image_tokens=40, over_budget="skip")
    item = ds2[0]
    assert item["id"] == "small" and item["skipped"][0]["kind"] == "image_budget"


def test_fixed_mode_cannot_downscale_it_skips(tmp_path, tok):
    path = _two_big_images(tmp_path, tok)
    ds = VLMDataset(path, tok, td.tiny_processor(), FIXED_TOKENS, image_folder=str(tmp_path),
                    max_image_tokens=FIXED_TOKENS)  # two images = 2 x 4 > 4
    rep = ds.validate()
    assert rep["by_kind"] == {"image_budget": 1} and "fixed resolution" in rep["examples"][0]
    assert rep["downscaled_samples"] == 0 and [ds.samples[k].id for k in ds.index] == ["small"]


def test_budget_nothing_fits_skips_even_with_downscale(tmp_path, tok):
    _two_big_images(tmp_path, tok)
    recs = [{"id": "big", "images": ["big1.png", "big2.png"], "messages": [
        {"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "two"}]},
        td.simple_record(1, image=None)]
    path = td.write_jsonl(tmp_path / "e.jsonl", recs)
    ds = _ds(path, tok, ANYRES, tmp_path, max_image_tokens=129)  # two base views alone are 130 tokens
    rep = ds.validate()
    assert rep["by_kind"] == {"image_budget": 1} and "even shrunk" in rep["examples"][0] and len(ds) == 1


def test_budget_keys_are_checked_and_shared_by_the_batch():
    assert sample_image_budget(None, None, 4) is None
    assert sample_image_budget(100, None, 4) == 100
    assert sample_image_budget(100, 200, 4) == 50 and sample_image_budget(None, 200, 3) == 66
    with pytest.raises(UserError, match="over_budget"):
        VLMDataset("x.jsonl", None, None, 1, over_budget="crop")
    with pytest.raises(UserError, match="max_image_tokens"):
        VLMDataset("x.jsonl", None, None, 1, max_image_tokens=0)


def test_budget_config_keys():
    from qwenvl_lab.core.config_io import ConfigError, load_config
    from qwenvl_lab.model.train_config import TrainConfig

    cfg = load_config(TrainConfig, None, ["max_image_tokens=300", "max_batch_image_tokens=1200", "over_budget=skip"])
    assert (cfg.max_image_tokens, cfg.max_batch_image_tokens, cfg.over_budget) == (300, 1200, "skip")
    assert TrainConfig().max_image_tokens is None and TrainConfig().over_budget == "downscale"  # off by default
    with pytest.raises(ConfigError, match="over_budget"):
        load_config(TrainConfig, None, ["over_budget=crop"])


def test_plan_downscale_factor_is_common_and_fits():
    rng = random.Random(1)
    for _ in range(50):
        imgs = [(rng.randint(8, 400), rng.randint(8, 400)) for _ in range(rng.randint(1, 4))]
        budget = rng.randint(2, 150)
        try:
            plan = plan_sample(NATIVE, imgs, [], 4, budget)
        except Exception as e:  # noqa: BLE001
            assert getattr(e, "kind", None) == "image_budget"
            continue
        assert plan.total <= budget
        assert list(plan.image_tokens) == [NATIVE.tokens(w, h, len(imgs)) for w, h in plan.images]
        if plan.factor < 1:
            assert plan.tokens_before > budget
            assert all(abs(w - round(w0 * plan.factor)) <= 1 for (w, _), (w0, _) in zip(plan.images, imgs))


# ----------------------------------------------------------------------- truncation and packing
def _random_sample(rng, folder, idx):
    msgs, images = [], []
    for _ in range(rng.randint(1, 4)):
        names = _random_images(folder, rng, rng.randint(0, 2), lo=4, hi=70)
        images += names
        q = "".join("<image>" for _ in names) + " q" * rng.randint(0, 20)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": " a" * rng.randint(1, 20)}]
    return Sample(id=f"p{idx}", messages=msgs, images=[str(folder / n) for n in images], videos=[])


def test_truncation_keeps_whole_variable_spans_and_counts_the_dropped(tmp_path, tok):
    rng = random.Random(7)
    fmt = ChatFormat.for_qwen(tok)
    checked = 0
    for case in range(50):
        res = ANYRES if case % 2 else NAFLEX
        s = _random_sample(rng, tmp_path, case)
        plan = plan_sample(res, [image_size(p) for p in s.images], [], 4)
        full = render(s, tok, plan.count)
        max_length = rng.randint(len(full.input_ids) // 3, len(full.input_ids))
        try:
            r = render(s, tok, plan.count, max_length=max_length)
        except Exception as e:  # noqa: BLE001 - the first turn alone does not fit: a counted skip
            assert getattr(e, "kind", None) == "too_long"
            continue
        kept = [p for kind, p in r.media]
        assert len(r.input_ids) <= max_length and kept == s.images[:len(kept)]  # trailing turns go whole
        assert _spans(r.input_ids, fmt) == list(plan.image_tokens[:len(kept)])  # each span: its own N, whole
        assert r.n_spans == len(kept) and r.dropped_images == len(s.images) - len(kept)
        checked += 1
    assert checked >= 30


def test_dataset_counts_turns_and_images_dropped_by_truncation(tmp_path, tok):
    rng = random.Random(11)
    samples = [_random_sample(rng, tmp_path, i) for i in range(20)]
    recs = [{"id": s.id, "images": s.images, "messages": s.messages} for s in samples]
    ds = _ds(td.write_jsonl(tmp_path / "d.jsonl", recs), tok, ANYRES, tmp_path, max_length=300,
             allow_absolute_paths=True)
    rep = ds.validate()
    dropped_images = dropped_turns = truncated = too_long = 0
    for s in samples:
        plan = plan_sample(ANYRES, [image_size(p) for p in s.images], [], 4)
        try:
            r = render(s, tok, plan.count, max_length=300)
        except Exception:  # noqa: BLE001 - too long even after dropping: skipped and counted
            too_long += 1
            continue
        truncated += bool(r.dropped_turns)
        dropped_images, dropped_turns = dropped_images + r.dropped_images, dropped_turns + r.dropped_turns
    assert truncated and dropped_images  # the seed makes both happen
    assert (rep["truncated_samples"], rep["dropped_images"], rep["dropped_turns"]) == (
        truncated, dropped_images, dropped_turns)
    assert rep["by_kind"].get("too_long", 0) == too_long and len(ds) == 20 - too_long


def test_packing_never_cuts_a_variable_span(tmp_path, tok):
    rng = random.Random(3)
    fmt = ChatFormat.for_qwen(tok)
    samples = [_random_sample(rng, tmp_path, i) for i in range(24)]
    rendered, items = [], []
    for s in samples:
        plan = plan_sample(NAFLEX, [image_size(p) for p in s.images], [], 4)
        r = render(s, tok, plan.count)
        rendered.append((r, list(plan.image_tokens)))
        items.append({"input_ids": torch.tensor(r.input_ids), "labels": torch.tensor(r.labels), "id": s.id})
    tokens = [sum(t) for _, t in rendered]
    sampler = PackingSampler([len(r.input_ids) for r, _ in rendered], max_length=400, seed=0,
                             image_tokens=tokens, max_image_tokens=40)
    for pack in sampler:
        assert sum(tokens[i] for i in pack) <= 40 or len(pack) == 1
        batch = PackingCollator()([[items[i] for i in pack]])
        row, bounds = batch["input_ids"][0].tolist(), batch["cu_seqlens"].tolist()
        for b in bounds[1:-1]:  # no boundary inside a span: the token before a boundary is no start/pad
            assert row[b - 1] not in (fmt.image_start_id, fmt.image_token_id)
        for i, lo, hi in zip(pack, bounds, bounds[1:]):
            assert _spans(row[lo:hi], fmt) == rendered[i][1]  # every sample's spans intact, in its segment


# ------------------------------------------------------------------------------- feature cache, run
def test_feature_cache_is_refused_in_a_variable_mode(tmp_path, tok):
    path = td.write_jsonl(tmp_path / "d.jsonl", [td.simple_record(0, image=None)])
    with pytest.raises(UserError, match="^feature_cache: .*'naflex'"):
        _ds(path, tok, NAFLEX, tmp_path, feature_cache=str(tmp_path / "cache"))


def test_run_builds_the_dataset_with_the_vlm_resolution_and_budgets(tmp_path, tok, fake_pixel_fns):
    from qwenvl_lab.model.train_config import TrainConfig
    from qwenvl_lab.trainer.run import build_datasets

    path = _two_big_images(tmp_path, tok)
    cfg = TrainConfig(data_path=[str(path)], image_folder=str(tmp_path), max_batch_image_tokens=24,
                      per_device_train_batch_size=2, over_budget="downscale", max_length=512)
    vlm = SimpleNamespace(chat_format=ChatFormat.for_qwen(tok), image_processor=td.tiny_processor(),
                          tokens_per_image=FIXED_TOKENS, image_token_id=None, resolution=NATIVE)
    train_ds, eval_ds = build_datasets(cfg, vlm)
    assert eval_ds is None and train_ds.resolution is NATIVE and train_ds.max_image_tokens == 12
    rep = train_ds.skip_report()
    assert rep["downscaled_samples"] == 1 and max(train_ds.image_tokens) <= 12
    del vlm.resolution  # the model side without the attribute: fixed mode, today's behaviour
    cfg.max_batch_image_tokens = None
    fixed_ds, _ = build_datasets(cfg, vlm)
    assert fixed_ds.resolution is None and fixed_ds[0]["pixel_values"].shape == (2, 3, 8, 8)
