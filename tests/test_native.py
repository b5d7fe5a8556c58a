"""Native-resolution towers: visual/native.py's pixels against transformers' Siglip2ImageProcessor, the
towers' `forward_grid` against transformers' own models (SigLIP2 NaFlex, CLIP / SigLIP with interpolated
position embeddings), mixed batches against each image alone, and model/native.py's merge + projector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from qwenvl_lab.model.native import native_rows, tokens_per_image
from qwenvl_lab.model.projector import build_projector, pixel_shuffle_grids
from qwenvl_lab.visual import build_tower
from qwenvl_lab.visual.native import native_pixels, patchify, unpatchify
from qwenvl_lab.visual.pixels import PIXEL_FNS, prepare_images
from qwenvl_lab.visual.resolution import Resolution

from tests import tiny_visual as tv

P = 8  # patch of every tiny tower here
SIZES = [(50, 30), (17, 90), (64, 64), (200, 13), (33, 41)]  # (width, height): mixed shapes and aspect ratios


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_pixels_table_names_native_pixels_for_both_modes():
    assert PIXEL_FNS["native"] is native_pixels and PIXEL_FNS["naflex"] is native_pixels


def native_batch(images, res, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's images through the project's one entry (visual/pixels.py) -> (pixel_values, image_grid)."""
    out = prepare_images(images, res, processor)
    return out["pixel_values"], out["image_grid"]


@pytest.fixture(scope="module")
def images():
    return [_image(w, h, i) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Tiny towers in transformers' own format; SigLIP2 with the preprocessor_config.json a hub one has."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    root = tmp_path_factory.mktemp("native")
    siglip2 = tv.save_tiny_siglip2(root / "siglip2", num_patches=16, patch_size=P)
    Siglip2ImageProcessorPil(patch_size=P, max_num_patches=24).save_pretrained(siglip2)
    return {
        "clip": tv.save_tiny_clip(root / "clip", image_size=32, patch_size=P),
        "siglip": tv.save_tiny_siglip(root / "siglip", image_size=32, patch_size=P),
        "siglip2": siglip2,
        "siglip2_bare": tv.save_tiny_siglip2(root / "siglip2_bare", num_patches=16, patch_size=P),
        "timm_vit": tv.save_tiny_timm_vit(root / "timm_vit"),
    }


def _naflex(tower) -> Resolution:
    return Resolution(mode="naflex", patch_size=tower.patch_size, max_num_patches=tower.max_num_patches)


def _native(merge: int = 2, max_pixels: int = 64 * 64) -> Resolution:
    return Resolution(mode="native", patch_size=P, merge=merge, min_pixels=16 * 16, max_pixels=max_pixels)


def _hf_siglip2_inputs(images, max_num_patches: int, resample: int = 2, patch: int = P):
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    proc = Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=max_num_patches, resample=resample)
    return proc(images, return_tensors="pt")  # pixel_values [n, L, p*p*3], pixel_attention_mask, spatial_shapes


# ----- pixels ----------------------------------------------------------------------------------------
def test_patchify_is_row_major_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 3 * P, 5 * P)
    rows = patchify(x, P)  # [2 * 15, 3, p, p]
    assert rows.shape == (30, 3, P, P)
    torch.testing.assert_close(rows[15 + 1 * 5 + 3], x[1, :, P : 2 * P, 3 * P : 4 * P], rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(rows, 3, 5), x, rtol=0, atol=0)


@pytest.mark.parametrize("resample", [2, 3])  # PIL codes: bilinear (SigLIP2's), bicubic
def test_naflex_pixels_equal_siglip2_image_processor(paths, images, resample):
    tower = build_tower("hf_siglip2", paths["siglip2"], resample=resample)
    res = _naflex(tower)
    ref = _hf_siglip2_inputs(images, tower.max_num_patches, resample)
    pixel_values, image_grid = native_batch(images, res, tower.processor)
    torch.testing.assert_close(image_grid, ref["spatial_shapes"].long(), rtol=0, atol=0)
    start = 0
    for i, (gh, gw) in enumerate(image_grid.tolist()):
        n = gh * gw
        assert int(ref["pixel_attention_mask"][i].sum()) == n == res.layout(*images[i].size).tokens
        ours = pixel_values[start : start + n].permute(0, 2, 3, 1).reshape(n, -1)  # their (py, px, c) order
        torch.testing.assert_close(ours, ref["pixel_values"][i, :n].float(), rtol=0, atol=1e-6)
        start += n
    assert start == pixel_values.shape[0]


def test_native_pixels_resize_to_the_layout(paths, images):
    tower = build_tower("hf_clip", paths["clip"])
    res = _native()
    img = images[0]
    lay = res.layout(*img.size)
    out = native_pixels(img, res, tower.processor)
    assert out.shape == (lay.grid[0] * lay.grid[1], 3, P, P)
    arr = np.asarray(img.resize(lay.resize, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    mean, std = torch.tensor(tower.processor.mean), torch.tensor(tower.processor.std)
    expected = ((torch.from_numpy(arr.copy()) - mean) / std).permute(2, 0, 1)  # [3, H, W]
    torch.testing.assert_close(unpatchify(out, *lay.grid)[0], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="fixed"):
        native_pixels(img, Resolution(), tower.processor)


def test_prepare_images_gives_the_batch_contract(paths, images):
    tower = build_tower("hf_clip", paths["clip"])
    res = _native()
    out = prepare_images(images, res, tower.processor)
    assert set(out) == {"pixel_values", "image_sizes", "image_grid"}
    assert out["image_grid"].dtype == torch.long and out["image_grid"].shape == (len(images), 2)
    assert out["image_grid"].tolist() == [list(res.layout(*img.size).grid) for img in images]
    assert out["pixel_values"].shape == (int(out["image_grid"].prod(dim=1).sum()), 3, P, P)
    assert prepare_images([], res, tower.processor) == {}
    with pytest.raises(ValueError, match="image 1: mode is 'L'"):
        prepare_images([images[0], images[1].convert("L")], res, tower.processor)


# ----- SigLIP2 NaFlex --------------------------------------------------------------------------------
def test_siglip2_max_num_patches_from_spec_or_checkpoint(paths):
    assert build_tower("hf_siglip2", paths["siglip2"]).max_num_patches == 24  # preprocessor_config.json
    assert build_tower("hf_siglip2", paths["siglip2"], max_num_patches=40).max_num_patches == 40  # spec key
    assert build_tower("hf_siglip2", paths["siglip2_bare"]).max_num_patches == 256  # transformers' default
    with pytest.raises(ValueError, match="max_num_patches must be >= 1"):
        build_tower("hf_siglip2", paths["siglip2"], max_num_patches=0)


@pytest.mark.parametrize("layer", [-1, 1])
def test_siglip2_forward_grid_equals_transformers(paths, images, layer):
    from transformers import Siglip2VisionModel

    ref_model = Siglip2VisionModel.from_pretrained(paths["siglip2"]).eval()
    tower = build_tower("hf_siglip2", paths["siglip2"], feature_layer=layer).eval()
    ref = _hf_siglip2_inputs(images, tower.max_num_patches)  # transformers' own preprocessing, end to end
    pixel_values, image_grid = native_batch(images, _naflex(tower), tower.processor)
    with torch.no_grad():
        hs = ref_model(**ref, output_hidden_states=True).hidden_states[layer]  # [n, L, D]
        out = tower.forward_grid(pixel_values, image_grid)  # [P_total, D]
    expected = hs[ref["pixel_attention_mask"].bool()]  # valid rows, image after image
    assert len(set(map(tuple, image_grid.tolist()))) > 2  # several grids in one batch
    assert out.shape == expected.shape == (pixel_values.shape[0], 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def _alone_equals_mixed(tower, pixel_values, image_grid, atol=1e-6):
    with torch.no_grad():
        mixed = tower.forward_grid(pixel_values, image_grid)
        start = 0
        for gh, gw in image_grid.tolist():
            n = gh * gw
            alone = tower.forward_grid(pixel_values[start : start + n], torch.tensor([[gh, gw]]))
            torch.testing.assert_close(mixed[start : start + n], alone, rtol=0, atol=atol)
            start += n


def test_siglip2_padding_never_changes_features(paths, images):
    tower = build_tower("hf_siglip2", paths["siglip2"], feature_layer=-1).eval()
    _alone_equals_mixed(tower, *native_batch(images, _naflex(tower), tower.processor))


def test_siglip2_refuses_more_patches_than_max(paths):
    tower = build_tower("hf_siglip2", paths["siglip2"])
    with pytest.raises(ValueError, match="max_num_patches=24"):
        tower.forward_grid(torch.randn(25, 3, P, P), torch.tensor([[5, 5]]))


def test_siglip2_forward_grid_trains(paths, images):
    tower = build_tower("hf_siglip2", paths["siglip2"]).train()
    pixel_values, image_grid = native_batch(images[:2], _naflex(tower), tower.processor)
    pixel_values.requires_grad_(True)
    tower.forward_grid(pixel_values, image_grid).square().sum().backward()
    assert pixel_values.grad.abs().sum(dim=(1, 2, 3)).gt(0).all()  # every real patch got a gradient
    weight = dict(tower.model.named_parameters())["embeddings.patch_embedding.weight"]
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ----- CLIP / SigLIP: interpolated position embeddings -------------------------------------------------
@pytest.mark.parametrize("backend,cls_name", [("hf_clip", "CLIPVisionModel"), ("hf_siglip", "SiglipVisionModel")])
def test_interpolated_grid_equals_transformers(paths, images, backend, cls_name):
    import transformers

    key = backend.removeprefix("hf_")
    ref_model = getattr(transformers, cls_name).from_pretrained(paths[key]).eval()
    tower = build_tower(backend, paths[key]).eval()  # feature_layer -2, patch rows
    pixel_values, image_grid = native_batch(images, _native(), tower.processor)
    grids = [tuple(g) for g in image_grid.tolist()]
    assert (8, 8) in grids and len(set(grids)) > 2  # 64x64 px: a 448-style grid, 2x the trained 4x4 per side
    with torch.no_grad():
        out = tower.forward_grid(pixel_values, image_grid)
        start = 0
        for gh, gw in grids:
            n = gh * gw
            x = unpatchify(pixel_values[start : start + n], gh, gw)  # [1, 3, H, W]
            hs = ref_model(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(out[start : start + n], hs[0, tower.num_prefix :], rtol=0, atol=1e-5)
            start += n
    _alone_equals_mixed(tower, pixel_values, image_grid)


def test_forward_grid_refusals(paths):
    x, grid = torch.randn(4, 3, P, P), torch.tensor([[2, 2]])
    with pytest.raises(ValueError, match="native / naflex resolution needs"):
        build_tower("timm", paths["timm_vit"]).forward_grid(x, grid)
    with pytest.raises(ValueError, match="drop_first"):
        build_tower("hf_clip", paths["clip"], select="drop_first").forward_grid(x, grid)
    clip = build_tower("hf_clip", paths["clip"], select="cls_patch")
    assert clip.forward_grid(x, grid).shape == (4, 32)  # patch rows only, never the CLS
    with pytest.raises(ValueError, match="covers 6 patches"):
        clip.forward_grid(x, torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="tower's patch is 8"):
        clip.forward_grid(torch.randn(4, 3, 4, 4), grid)
    assert clip.forward_grid(x[:0], grid[:0]).shape == (0, 32)


# ----- merge + projector --------------------------------------------------------------------------------
def test_pixel_shuffle_grids_is_qwen2vl_merge_order():
    grids, s, c = [(2, 4), (4, 2)], 2, 3
    rows = torch.arange(16 * c, dtype=torch.float32).reshape(16, c)
    out = pixel_shuffle_grids(rows, grids, s)
    expected, start = [], 0
    for gh, gw in grids:  # Qwen2-VL: blocks row-major; inside a block (dy, dx) row-major; channels last
        for bi in range(gh // s):
            for bj in range(gw // s):
                block = [rows[start + (bi * s + dy) * gw + bj * s + dx] for dy in range(s) for dx in range(s)]
                expected.append(torch.cat(block))
        start += gh * gw
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=0)


def test_native_rows_tokens_and_mixed_batch(paths, images):
    tower = build_tower("hf_clip", paths["clip"]).eval()
    res = _native(merge=2)
    proj = build_projector("mlp2x_gelu", tower.hidden_size, 48, reduce="pixel_shuffle", reduce_factor=2)
    pixel_values, image_grid = native_batch(images, res, tower.processor)
    with torch.no_grad():
        feats = native_rows(tower.forward_grid(pixel_values, image_grid), image_grid, 2, proj)  # [T, 48]
    counts = tokens_per_image(image_grid, 2)
    assert counts == [res.layout(*img.size).tokens for img in images]
    assert counts == [gh * gw // 4 for gh, gw in image_grid.tolist()]
    assert feats.shape == (sum(counts), 48)
    tok = 0
    with torch.no_grad():
        for img, n in zip(images, counts):
            pv, grid = native_batch([img], res, tower.processor)
            alone = native_rows(tower.forward_grid(pv, grid), grid, 2, proj)
            torch.testing.assert_close(feats[tok : tok + n], alone, rtol=0, atol=1e-6)
            tok += n


def test_native_rows_naflex_is_one_token_per_patch(paths, images):
    tower = build_tower("hf_siglip2", paths["siglip2"]).eval()
    res = _naflex(tower)
    proj = build_projector("linear", tower.hidden_size, 16)
    pixel_values, image_grid = native_batch(images, res, tower.processor)
    with torch.no_grad():
        feats = native_rows(tower.forward_grid(pixel_values, image_grid), image_grid, 1, proj)
    assert feats.shape == (sum(res.layout(*img.size).tokens for img in images), 16)


def test_native_rows_projector_checks():
    rows, grid = torch.randn(16, 8), torch.tensor([[4, 4]])
    with pytest.raises(ValueError, match="avg_pool"):
        native_rows(rows, grid, 2, build_projector("linear", 8, 16, reduce="avg_pool", reduce_factor=2))
    with pytest.raises(ValueError, match="reduce_factor=4"):
        native_rows(rows, grid, 2, build_projector("linear", 8, 16, reduce="pixel_shuffle", reduce_factor=4))
    with pytest.raises(ValueError, match="reads 8 channels"):
        native_rows(rows, grid, 2, build_projector("linear", 8, 16))
    assert native_rows(rows, grid, 2, build_projector("linear", 32, 16)).shape == (4, 16)  # in_dim = 4C
    with pytest.raises(ValueError, match="3x4 patches"):
        native_rows(torch.randn(12, 8), torch.tensor([[3, 4]]), 2, build_projector("linear", 32, 16))


def test_real_photos_naflex_pixels_at_hub_sizes(shared_images):
    """The photos at a real SigLIP2 geometry (patch 16, 256 patches): pixels equal transformers' processor."""
    from qwenvl_lab.visual.processor import ImageProcessor

    photos = [Image.open(shared_images / n).convert("RGB") for n in ("waterview.jpg", "extreme_ironing.jpg")]
    ref = _hf_siglip2_inputs(photos, 256, patch=16)
    res = Resolution(mode="naflex", patch_size=16, max_num_patches=256)
    pixel_values, image_grid = native_batch(photos, res, ImageProcessor(224, (0.5,) * 3, (0.5,) * 3, resample=2))
    torch.testing.assert_close(image_grid, ref["spatial_shapes"].long(), rtol=0, atol=0)
    n = int(image_grid[0].prod())
    ours = pixel_values[:n].permute(0, 2, 3, 1).reshape(n, -1)
    torch.testing.assert_close(ours, ref["pixel_values"][0, :n].float(), rtol=0, atol=1e-6)


def test_timm_cnn_reads_each_image_at_its_own_size(tmp_path):
    """A CNN tower's native path: the rows of a gh x gw patch grid equal the CNN's feature map of that whole
    image (flattened row-major), and a mixed batch equals each image alone; the model builds in native mode."""
    path = tv.save_tiny_timm_cnn(tmp_path / "cnn", image_size=32)
    tower = build_tower("timm", str(path), feature_layer=-1, pretrained=False).eval()
    assert tower.variable_grid and tower.patch_size == 32 // tower.grid[0] == 8
    res = Resolution(mode="native", patch_size=8, merge=1, min_pixels=64, max_pixels=64 * 64)
    images = [_image(w, h, i) for i, (w, h) in enumerate(SIZES)]
    batch = prepare_images(images, res, tower.processor)
    with torch.no_grad():
        rows = tower.forward_grid(batch["pixel_values"], batch["image_grid"])
        start = 0
        for gh, gw in batch["image_grid"].tolist():
            alone = batch["pixel_values"][start:start + gh * gw]
            whole = unpatchify(alone, gh, gw)  # [1, 3, gh*8, gw*8]
            fmap = tower.model.forward_intermediates(whole, indices=[tower.feature_layer], intermediates_only=True)[0]
            torch.testing.assert_close(rows[start:start + gh * gw], fmap.flatten(2).transpose(1, 2)[0], atol=1e-6,
                                       rtol=0)
            torch.testing.assert_close(tower.forward_grid(alone, torch.tensor([[gh, gw]])),
                                       rows[start:start + gh * gw], atol=1e-6, rtol=0)
            start += gh * gw
    assert start == rows.shape[0]
