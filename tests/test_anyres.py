"""LLaVA-NeXT anyres through the model: pixels, packing and logits equal transformers' on tiny random weights.

- pixels (visual/anyres.py) equal `LlavaNextImageProcessorPil` (transformers' PIL backend) within 1e-6;
- the packed rows (model/anyres.py) equal `LlavaNextModel.pack_image_features` (and LLaVA-OneVision's
  `anyres_max` shrink), and every image's row count equals `Resolution.layout(...).tokens`;
- an imported `llava_next` directory gives transformers' logits within 1e-5 (fp32) with both LM backends,
  for one sequence holding a 300x200 and a 17x301 (W x H) image;
- the config keys, the learned newline (trains and saves with the projector), chat, and the errors.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image
from qwenvl_lab.model import VLM
from qwenvl_lab.model.anyres import image_layouts, pack_anyres
from qwenvl_lab.visual.anyres import anyres_pixels
from qwenvl_lab.visual.processor import ImageProcessor
from qwenvl_lab.visual.resolution import Resolution, sweep_sizes

from tests.tiny_model import build_tiny_vlm, randomize_, tiny_tower_spec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# (tower image size, patch size) -> pinpoints, multiples of the size. 28/14: a 2x2 grid per crop, so the
# 17x301 image's map (6 x 2) loses both columns to unpadding; 32/8: 4x4, its 12 x 4 map loses all 4.
PINS = {
    28: [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]],
    32: [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]],
}
GEOMETRIES = [(28, 14), (32, 8)]
SIZES = [(300, 200), (17, 301), (301, 17), (32, 32), (1, 1), (640, 480), (33, 31), (5, 700), (123, 457)]
TOKEN = 100  # the placeholder id of the tiny LLaVA-NeXT models


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_processor(size: int):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=PINS[size],
        image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)


def resolution(size: int, patch: int, **kw) -> Resolution:
    g = size // patch
    return Resolution(mode="anyres", image_size=size, patch_size=patch, grid=(g, g), tokens_per_crop=g * g,
                      pinpoints=tuple(tuple(p) for p in PINS[size]), **kw)


def save_tiny_llava_next(path, text: str = "qwen2", size: int = 28, patch: int = 14, seed: int = 0):
    """A random tiny transformers LlavaNextForConditionalGeneration (CLIP tower, 'default' strategy) with
    its PIL image processor's preprocessor_config.json."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        Qwen2Config,
    )

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=size, patch_size=patch)
    tkw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)
    tc = Qwen2Config(**tkw) if text == "qwen2" else LlamaConfig(**tkw)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=TOKEN, image_grid_pinpoints=PINS[size],
                          vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaNextForConditionalGeneration(cfg)
    randomize_(model, seed)
    model.save_pretrained(str(path))
    hf_processor(size).save_pretrained(str(path))
    return path


# ----- pixels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,patch", GEOMETRIES)
def test_pixels_equal_llava_next_pil_processor(size, patch):
    res = resolution(size, patch)
    ours = ImageProcessor(size, CLIP_MEAN, CLIP_STD, mode="pad", resample="bicubic")
    for w, h in SIZES:
        img = random_image(w, h)
        want = hf_processor(size)([img], return_tensors="pt")
        got = anyres_pixels(img, res, ours)
        assert got.shape[0] == res.layout(w, h).crops
        torch.testing.assert_close(got, want["pixel_values"][0], rtol=0, atol=1e-6)
        assert want["image_sizes"][0].tolist() == [h, w]
    # multi_image="base": an image of a two-image sample is its base view only (transformers' crop 0)
    based = anyres_pixels(random_image(300, 200), resolution(size, patch, multi_image="base"), ours, n_images=2)
    want = hf_processor(size)([random_image(300, 200)], return_tensors="pt")["pixel_values"][0, :1]
    assert based.shape[0] == 1
    torch.testing.assert_close(based, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="mode is 'L'"):
        anyres_pixels(Image.new("L", (9, 9)), res, ours)


# ----- packing ---------------------------------------------------------------------------------------
def _hf_config(size: int, patch: int):
    return types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=size, patch_size=patch), image_grid_pinpoints=PINS[size]))


@pytest.mark.parametrize("size,patch", GEOMETRIES)
def test_packing_equals_transformers_pack_image_features_over_a_sweep(size, patch):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    res, d = resolution(size, patch, multi_image="anyres"), 8
    g = torch.Generator().manual_seed(0)
    newline = torch.randn(d, generator=g)
    sizes = sorted(set(SIZES) | set(sweep_sizes(res)))
    crops = torch.tensor([res.layout(w, h).crops for w, h in sizes])
    image_sizes = torch.tensor([[h, w] for w, h in sizes])
    rows = torch.randn(int(crops.sum()), res.tokens_per_crop, d, generator=g)  # [n_crops, T, D]
    layouts = image_layouts(res, image_sizes, crops)
    ours = pack_anyres(rows, image_sizes, layouts, res, newline)
    theirs, lens = LlavaNextModel.pack_image_features(
        _hf_config(size, patch), list(torch.split(rows, crops.tolist())), image_sizes, "default", newline)
    assert lens.tolist() == [res.layout(w, h).tokens for w, h in sizes] == [lay.tokens for lay in layouts]
    torch.testing.assert_close(ours, torch.cat(theirs), rtol=0, atol=0)


@pytest.mark.parametrize("anyres_max", [1, 2])
def test_anyres_max_shrink_equals_llava_onevision(anyres_max):
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    res, d = resolution(32, 8, multi_image="anyres", anyres_max=anyres_max), 8
    g = torch.Generator().manual_seed(1)
    newline = torch.randn(d, generator=g)
    sizes = [(300, 200), (640, 480), (33, 31), (96, 300), (64, 64)]
    crops = torch.tensor([res.layout(w, h).crops for w, h in sizes])
    image_sizes = torch.tensor([[h, w] for w, h in sizes])
    rows = torch.randn(int(crops.sum()), 16, d, generator=g)
    layouts = image_layouts(res, image_sizes, crops)
    assert any(lay.grid != resolution(32, 8).layout(w, h).grid for lay, (w, h) in zip(layouts, sizes))  # shrunk
    ours = pack_anyres(rows, image_sizes, layouts, res, newline)
    theirs, lens = LlavaOnevisionModel.pack_image_features(
        _hf_config(32, 8), list(torch.split(rows, crops.tolist())), image_sizes, newline, f"anyres_max_{anyres_max}")
    assert lens.tolist() == [lay.tokens for lay in layouts]
    torch.testing.assert_close(ours, torch.cat(theirs), rtol=0, atol=1e-6)


def test_crop_counts_that_disagree_with_the_rule_are_refused():
    res = resolution(32, 8)
    with pytest.raises(ValueError, match=r"image 0 \(300x200, 1 image\(s\).*3 crop\(s\) given.*gives 5"):
        image_layouts(res, torch.tensor([[200, 300]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="1 image.*image_crops 2"):
        image_layouts(res, torch.tensor([[200, 300]]), torch.tensor([5, 1]))


# ----- logits parity with transformers -------------------------------------------------------------------
def _parity_inputs(vlm: VLM, size: int):
    """One sequence with a 300x200 and a 17x301 image: ours (flat crops + sizes) and transformers' (5-D)."""
    images = [random_image(300, 200), random_image(17, 301)]
    tokens = vlm.image_tokens(images)
    ids = torch.tensor([[1, 2, 3] + [TOKEN] * tokens[0] + [4, 5] + [TOKEN] * tokens[1] + [6]])
    ours = vlm.image_inputs(images)
    theirs = hf_processor(size)(images, return_tensors="pt")
    for i, c in enumerate(ours["image_crops"].tolist()):  # the same pixels, image by image
        start = int(ours["image_crops"][:i].sum())
        torch.testing.assert_close(ours["pixel_values"][start : start + c], theirs["pixel_values"][i, :c],
                                   rtol=0, atol=1e-6)
    assert ours["image_sizes"].tolist() == theirs["image_sizes"].tolist()
    return ids, ours, theirs


@pytest.mark.parametrize("text,backend,size,patch", [
    ("qwen2", "qwen", 28, 14), ("qwen2", "hf", 28, 14), ("qwen2", "qwen", 32, 8), ("qwen2", "hf", 32, 8),
    ("llama", "hf", 28, 14),
])
def test_llava_next_import_matches_transformers_logits(tmp_path, text, backend, size, patch):
    from transformers import LlavaNextForConditionalGeneration

    path = save_tiny_llava_next(tmp_path / "next", text=text, size=size, patch=patch)
    ref = LlavaNextForConditionalGeneration.from_pretrained(str(path)).eval()
    vlm = VLM.from_pretrained(path, lm_backend=backend) if backend == "hf" else VLM.from_pretrained(path)
    assert vlm.config.lm_backend == backend and vlm.resolution.mode == "anyres"
    assert vlm.config.multi_image == "anyres" and vlm.config.image_grid_pinpoints == PINS[size]
    torch.testing.assert_close(vlm.image_newline, ref.model.image_newline, rtol=0, atol=0)
    thin = vlm.resolution.layout(17, 301)
    assert thin.grid == ((6, 0) if size == 28 else (12, 0))  # unpadding trims every column: newlines only
    ids, ours, theirs = _parity_inputs(vlm, size)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=theirs["pixel_values"], image_sizes=theirs["image_sizes"]).logits
        got = vlm(ids, **ours, image_counts=[2]).logits
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # A trainable-only checkpoint of the import keeps a trained newline and points back at the directory.
    with torch.no_grad():
        vlm.image_newline.add_(0.5)
        tuned = vlm(ids, **ours).logits
    assert (tuned - got).abs().max() > 1e-4  # the newline reaches the logits
    vlm.save_pretrained(tmp_path / "ft", trainable_only=True)
    again = VLM.from_pretrained(tmp_path / "ft").eval()
    assert again.config.init_from == str(path) and again.config.lm_backend == backend
    with torch.no_grad():
        torch.testing.assert_close(again(ids, **ours).logits, tuned, rtol=0, atol=0)


def test_llava_next_full_strategy_with_clip_is_refused(tmp_path):
    import json

    path = save_tiny_llava_next(tmp_path / "next")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'.*patch tokens only"):
        VLM.from_pretrained(path)


# ----- our own VLM with anyres ---------------------------------------------------------------------------
def tiny_anyres(tmp_path, **overrides) -> VLM:
    """The tiny CLIP (32 px, patch 8: 4x4) + tiny Qwen2 VLM with anyres on (pinpoints up to 3 crops)."""
    return build_tiny_vlm(tmp_path, tower="clip", image_grid_pinpoints=PINS[32], **overrides)


def anyres_batch_of(vlm: VLM, samples: list[list[tuple[int, int]]], seed: int = 0) -> dict:
    """Right-padded batch: sample b holds images of the given (width, height) sizes, each span its count."""
    inputs, ids_rows, n = {}, [], []
    for b, sizes in enumerate(samples):
        images = [random_image(w, h, seed + b) for w, h in sizes]
        ids = [5 + b, 6, 7]
        for t in vlm.image_tokens(images) or []:
            ids += [vlm.image_token_id] * t + [8, 9]
        ids_rows.append(ids)
        n.append(len(images))
        for k, v in vlm.image_inputs(images).items():
            inputs.setdefault(k, []).append(v)
    width = max(len(r) for r in ids_rows) + 1
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids_rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids_rows])
    labels = input_ids.masked_fill((mask == 0) | (input_ids == vlm.image_token_id), -100)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, image_counts=torch.tensor(n),
                **{k: torch.cat(v) for k, v in inputs.items()})


def test_no_resolution_key_keeps_the_fixed_model(tmp_path):
    vlm = build_tiny_vlm(tmp_path, tower="clip")
    res = vlm.resolution
    assert (res.mode, res.image_size, res.grid, res.tokens_per_crop) == ("fixed", 32, (4, 4), vlm.tokens_per_image)
    assert vlm.image_newline is None and not any("newline" in k for k in vlm.state_dict())
    assert res.layout(300, 200).tokens == vlm.tokens_per_image and vlm.image_tokens([random_image(9, 9)]) is None
    assert vlm.config.image_grid_pinpoints is None and not vlm.config.anyres


@pytest.mark.parametrize("key,value,match", [
    ("image_grid_pinpoints", [[32, 64], [64]], "image_grid_pinpoints"),
    ("image_grid_pinpoints", [], "image_grid_pinpoints"),
    ("image_grid_pinpoints", [[32, "64"]], "image_grid_pinpoints"),
    ("multi_image", "all", "multi_image='all'"),
    ("anyres_max", 0, "anyres_max=0"),
    ("image_newline", "yes", "image_newline='yes'"),
])
def test_bad_resolution_keys_name_the_key(key, value, match):
    from qwenvl_lab.model import VLMConfig

    with pytest.raises(ValueError, match=match):
        VLMConfig.from_dict({"towers": [{"backend": "hf_clip", "name_or_path": "x"}], key: value})


def test_anyres_refuses_cls_rows_and_pinpoints_off_the_grid(tmp_path):
    with pytest.raises(ValueError, match=r"image_grid_pinpoints \(anyres\).*select=patch"):
        tiny_anyres(tmp_path, towers=[{**_clip_spec(tmp_path), "select": "cls_patch"}])
    with pytest.raises(ValueError, match=r"image_grid_pinpoints.*\[32, 48\] is not a multiple"):
        build_tiny_vlm(tmp_path, tower="clip", image_grid_pinpoints=[[32, 48]])


def _clip_spec(tmp_path) -> dict:
    return tiny_tower_spec(tmp_path, "clip")


@pytest.mark.parametrize("lm_backend", ["qwen", "hf"])
def test_anyres_train_step_multi_image_base_and_newline_gradient(tmp_path, lm_backend):
    """Sample 0: one 300x200 image (base + tiles); sample 1: two images (multi_image='base': base views);
    every placeholder gets its row, the loss backpropagates into the projector and the newline."""
    vlm = tiny_anyres(tmp_path, lm_backend=lm_backend).train()
    batch = anyres_batch_of(vlm, [[(300, 200)], [(17, 301), (64, 40)]])
    assert batch["image_crops"].tolist() == [vlm.resolution.layout(300, 200).crops, 1, 1]
    slots = (batch["input_ids"] == vlm.image_token_id).sum(1).tolist()
    assert slots == [vlm.resolution.layout(300, 200).tokens, 2 * (16 + 1)]
    out = vlm(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert vlm.image_newline.grad is not None and vlm.image_newline.grad.abs().sum() > 0
    assert vlm.projector.mlp[0].weight.grad.abs().sum() > 0
    # Cached tower output gives the same rows as the pixels.
    with torch.no_grad():
        feats = vlm.towers(batch["pixel_values"])  # [n_crops, 16, C]
        a = vlm.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits
        b = vlm(**{k: v for k, v in batch.items() if k not in ("labels", "pixel_values")}, image_features=feats).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_anyres_count_errors_are_loud(tmp_path):
    vlm = tiny_anyres(tmp_path).eval()
    batch = anyres_batch_of(vlm, [[(300, 200)], [(17, 301), (64, 40)]])
    batch.pop("labels")
    with pytest.raises(ValueError, match="need image_sizes"):
        vlm(**{k: v for k, v in batch.items() if k != "image_sizes"})
    with pytest.raises(ValueError, match=r"image 0 \(300x200, 2 image\(s\) in its sample\): 5 crop\(s\).*gives 1"):
        vlm(**{**batch, "image_counts": torch.tensor([2, 1])})
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == vlm.image_token_id).nonzero()[0]] = 8  # one placeholder short in sample 0
    n = vlm.resolution.layout(300, 200).tokens
    with pytest.raises(ValueError, match=rf"sample 0: {n - 1} image placeholders but 1 image\(s\) of \[{n}\]"):
        vlm(**{**batch, "input_ids": ids})
    crops = batch["image_crops"].clone()
    crops[0] -= 1
    with pytest.raises(ValueError, match=r"image 0 \(300x200.*crop\(s\) given"):
        vlm(**{**batch, "image_crops": crops})


def test_idle_anchor_reaches_the_newline(tmp_path):
    """A training batch without images still gives the newline a (zero) gradient: every rank the same params."""
    vlm = tiny_anyres(tmp_path).train()
    ids = torch.tensor([[5, 6, 7, 8]])
    vlm(input_ids=ids, labels=ids).loss.backward()
    assert vlm.image_newline.grad is not None and vlm.image_newline.grad.abs().sum() == 0


def test_newline_trains_and_saves_with_the_projector(tmp_path):
    from qwenvl_lab.model.stages import part_of, set_trainable

    vlm = tiny_anyres(tmp_path, multi_image="anyres", anyres_max=1)
    assert part_of("image_newline") == "projector"
    set_trainable(vlm, "align")
    assert vlm.image_newline.requires_grad and not any(p.requires_grad for p in vlm.lm.parameters())
    with torch.no_grad():
        vlm.image_newline.normal_()
    batch = anyres_batch_of(vlm.eval(), [[(300, 200), (96, 300)]])
    batch.pop("labels")
    with torch.no_grad():
        want = vlm(**batch).logits
    vlm.save_pretrained(tmp_path / "ck", trainable_only=True)
    again = VLM.from_pretrained(tmp_path / "ck")
    assert again.resolution == vlm.resolution and again.config.anyres_max == 1
    torch.testing.assert_close(again.image_newline, vlm.image_newline, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, want, rtol=0, atol=0)


def test_anyres_with_a_token_reducing_projector(tmp_path):
    """pixel_shuffle by 2 turns each crop's 4x4 grid into 2x2 rows; the crops' reduced grids join the same way."""
    vlm = tiny_anyres(tmp_path, reduce="pixel_shuffle", reduce_factor=2).eval()
    assert vlm.resolution.grid == (2, 2) and vlm.resolution.tokens_per_crop == 4 == vlm.tokens_per_image
    batch = anyres_batch_of(vlm, [[(300, 200)], [(17, 301)]])
    batch.pop("labels")
    assert (batch["input_ids"] == vlm.image_token_id).sum(1).tolist() == [
        vlm.resolution.layout(300, 200).tokens, vlm.resolution.layout(17, 301).tokens]
    with torch.no_grad():
        assert torch.isfinite(vlm(**batch).logits).all()


def test_anyres_chat_spans_and_chat_batch_equal_each_chat_alone(tmp_path):
    vlm = tiny_anyres(tmp_path).eval()
    big, thin, small = random_image(300, 200), random_image(17, 301), random_image(40, 30)
    msgs = [{"role": "user", "content": "<image>\nwhat is it?"}]
    ids = vlm.chat_ids(msgs, 1, vlm.image_tokens([big]))
    assert ids.count(vlm.image_token_id) == vlm.resolution.layout(300, 200).tokens
    convs = [
        ([big], [{"role": "user", "content": "what?"}]),
        ([], [{"role": "user", "content": "a longer question with no image at all"}]),
        ([thin, small], [{"role": "user", "content": "<image> and <image>: same?"}]),
    ]
    together = vlm.chat_batch(convs, max_new_tokens=4, stop_token_ids=[])
    alone = [vlm.chat(imgs, m, max_new_tokens=4, stop_token_ids=[]) for imgs, m in convs]
    assert together == alone


# ----- export: our anyres model -> transformers' llava_next directory -> back ------------------------------
def test_export_llava_next_round_trip(tmp_path):
    from qwenvl_lab.model.export import export_llava_hf
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextImageProcessorPil

    vlm = tiny_anyres(tmp_path, multi_image="anyres")
    randomize_(vlm, seed=3)
    vlm.eval()
    images = [random_image(300, 200), random_image(17, 301)]
    ids = torch.tensor([vlm.chat_ids([{"role": "user", "content": "<image>\nhello <image> what?"}], 2,
                                     vlm.image_tokens(images))])
    inputs = vlm.image_inputs(images)
    with torch.no_grad():
        ours = vlm(ids, **inputs).logits
    dst = export_llava_hf(vlm, tmp_path / "next")
    hf = AutoModelForImageTextToText.from_pretrained(str(dst), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlavaNextForConditionalGeneration"
    px = LlavaNextImageProcessorPil.from_pretrained(str(dst))(images, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=px["pixel_values"], image_sizes=px["image_sizes"]).logits
    assert ours.abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    # transformers' processor and the exported chat template expand each image to our counts.
    proc = AutoProcessor.from_pretrained(str(dst))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nhello "},
                                             {"type": "image"}, {"type": "text", "text": " what?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert proc(images=images, text=text, return_tensors="pt")["input_ids"][0].tolist() == ids[0].tolist()

    again = VLM.from_pretrained(dst)
    assert again.resolution == vlm.resolution
    with torch.no_grad():
        torch.testing.assert_close(again(ids, **inputs).logits, ours, rtol=0, atol=1e-5)


def test_export_refuses_anyres_rules_transformers_lacks(tmp_path):
    from qwenvl_lab.model.export import export_llava_hf

    with pytest.raises(ValueError, match="multi_image=anyres.*got multi_image='base'"):
        export_llava_hf(tiny_anyres(tmp_path), tmp_path / "out")


def test_visual_pixels_table_entry_gives_the_model_inputs(tmp_path, monkeypatch):
    """`visual.pixels.PIXEL_FNS["anyres"] = anyres_pixels` (the one line the table still needs) makes
    `prepare_images` (the dataset's call) give what the model's chat path feeds it."""
    from qwenvl_lab.visual import pixels

    monkeypatch.setitem(pixels.PIXEL_FNS, "anyres", anyres_pixels)
    vlm = tiny_anyres(tmp_path)
    for images in ([random_image(300, 200)], [random_image(17, 301), random_image(40, 30)]):
        got = pixels.prepare_images(images, vlm.resolution, vlm.image_processor)
        want = vlm.image_inputs(images)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
