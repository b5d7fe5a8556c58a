"""Vision towers: every backend saved in its native format, loaded BY PATH through build_tower, and
compared with the backend's own hidden states / features."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from qwenvl_lab.visual import BACKENDS, ImageProcessor, MultiTower, build_tower
from safetensors.torch import load_file

from tests import tiny_visual as tv


class _Towers(dict):
    """Tower directories by key; a key whose backend package is not installed skips the test using it."""

    def __missing__(self, key):
        pytest.skip(f"no {key} tower: its package is not installed (an optional dependency)")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    towers = _Towers(
        clip=tv.save_tiny_clip(root / "clip"),
        siglip=tv.save_tiny_siglip(root / "siglip"),
        siglip2=tv.save_tiny_siglip2(root / "siglip2"),
        timm_vit=tv.save_tiny_timm_vit(root / "timm_vit"),
        timm_cnn=tv.save_tiny_timm_cnn(root / "timm_cnn"),
    )
    if importlib.util.find_spec("open_clip") is not None:
        towers["open_clip"] = tv.save_tiny_open_clip(root / "open_clip")
    return towers


def _pixels(tower, n=2):
    return torch.randn(n, 3, tower.image_size, tower.image_size)


def _assert_loaded(module: torch.nn.Module, weights_file, strip: str = "") -> None:
    """Every saved tensor that the tower holds equals the file's: the real loading code ran."""
    saved = load_file(str(weights_file))
    own = module.state_dict()
    matched = 0
    for k, v in saved.items():
        if not k.startswith(strip):
            continue  # e.g. open_clip's text tower
        k = k[len(strip) :]
        if k in own:
            assert torch.equal(own[k], v), k
            matched += 1
    assert matched >= len(own) // 2, f"only {matched} of {len(own)} tensors found in {weights_file}"


# ----- transformers --------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1, -1, -2])
def test_hf_clip_feature_layer_matches_transformers(paths, layer):
    from transformers import CLIPVisionModel

    ref = CLIPVisionModel.from_pretrained(paths["clip"]).eval()
    patch = build_tower("hf_clip", paths["clip"], feature_layer=layer).eval()
    both = build_tower("hf_clip", paths["clip"], feature_layer=layer, select="cls_patch").eval()
    _assert_loaded(patch.model, paths["clip"] / "model.safetensors")
    x = _pixels(patch)
    with torch.no_grad():
        hs = ref(pixel_values=x, output_hidden_states=True).hidden_states[layer]  # [N, 1 + 16, 32]
        out_p, out_c = patch(x), both(x)
    assert patch.has_cls and patch.num_tokens == 16 and both.num_tokens == 17 and patch.hidden_size == 32
    assert out_p.shape == (2, 16, 32) and out_c.shape == (2, 17, 32)
    torch.testing.assert_close(out_p, hs[:, 1:], rtol=0, atol=0)  # CLS dropped, patches untouched
    torch.testing.assert_close(out_c, hs, rtol=0, atol=0)


@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_hf_siglip_keeps_every_patch(paths, select):
    from transformers import SiglipVisionModel

    ref = SiglipVisionModel.from_pretrained(paths["siglip"]).eval()
    tower = build_tower("hf_siglip", paths["siglip"], select=select).eval()
    _assert_loaded(tower.model, paths["siglip"] / "model.safetensors")
    x = _pixels(tower)
    with torch.no_grad():
        hs = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        out = tower(x)
    n_patches = (32 // 8) ** 2
    assert not tower.has_cls
    assert tower.num_tokens == n_patches == hs.shape[1] == out.shape[1]  # nothing dropped as a "CLS"
    torch.testing.assert_close(out, hs, rtol=0, atol=0)


def test_hf_siglip2_fixed_resolution_matches_transformers(paths):
    from transformers import Siglip2VisionModel
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    ref = Siglip2VisionModel.from_pretrained(paths["siglip2"]).eval()
    tower = build_tower("hf_siglip2", paths["siglip2"], feature_layer=-1).eval()
    x = _pixels(tower)
    # The transformers image processor's own patch layout, image by image.
    patches = torch.stack([convert_image_to_patches(img, 8) for img in x])  # [N, 16, 192]
    with torch.no_grad():
        hs = ref(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 4], [4, 4]]),
            output_hidden_states=True,
        ).hidden_states[-1]
        out = tower(x)
    assert tower.image_size == 32 and tower.num_tokens == 16 and not tower.has_cls
    torch.testing.assert_close(out, hs, rtol=1e-6, atol=1e-6)


def test_hf_clip_loads_from_full_clip_model_dir(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    vc = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    tc = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    full = CLIPModel(CLIPConfig(vision_config=vc, text_config=tc, projection_dim=16)).eval()
    full.save_pretrained(tmp_path)
    tower = build_tower("hf_clip", tmp_path, feature_layer=-1, select="cls_patch").eval()
    x = _pixels(tower)
    with torch.no_grad():
        hs = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        out = tower(x)
    assert tower.grid == (2, 2) and out.shape == (2, 5, 32)
    torch.testing.assert_close(out, hs, rtol=0, atol=0)
    # No preprocessor_config.json in the dir: CLIP's published mean/std are the fallback.
    assert tower.processor.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


# ----- open_clip -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [1, 2, -1])
def test_open_clip_feature_layer_matches_open_clip(paths, layer):
    open_clip = pytest.importorskip("open_clip")

    clip = open_clip.create_model(f"local-dir:{paths['open_clip']}").eval()
    tower = build_tower("open_clip", paths["open_clip"], feature_layer=layer, select="cls_patch").eval()
    _assert_loaded(tower.model, paths["open_clip"] / "open_clip_model.safetensors", strip="visual.")
    x = _pixels(tower)
    with torch.no_grad():
        k = layer % 3  # 3 hidden states: embeddings + 2 blocks; open_clip numbers blocks from 0
        ref = clip.visual.forward_intermediates(
            x, indices=[k - 1], output_fmt="NLC", intermediates_only=True, output_extra_tokens=True
        )
        out = tower(x)
        pooled = clip.encode_image(x)
    assert tower.has_cls and tower.num_tokens == 17 and out.shape == (2, 17, 32)
    torch.testing.assert_close(out[:, 1:], ref["image_intermediates"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :1], ref["image_intermediates_prefix"][0], rtol=0, atol=1e-6)
    if k == 2:  # the last hidden state's CLS, pooled open_clip's way, is its image embedding
        v = clip.visual
        torch.testing.assert_close(v.ln_post(out[:, 0]) @ v.proj, pooled, rtol=1e-5, atol=1e-5)
    patch = build_tower("open_clip", paths["open_clip"], feature_layer=layer).eval()
    with torch.no_grad():
        torch.testing.assert_close(patch(x), out[:, 1:], rtol=0, atol=0)


# ----- timm ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [1, -1, -2])
def test_timm_vit_feature_layer_matches_timm(paths, layer):
    import timm

    ref = timm.create_model(f"local-dir:{paths['timm_vit']}", pretrained=True).eval()
    tower = build_tower("timm", paths["timm_vit"], feature_layer=layer).eval()
    _assert_loaded(tower.model, paths["timm_vit"] / "model.safetensors")
    x = _pixels(tower)
    k = layer % 3
    with torch.no_grad():
        ((patches, prefix),) = ref.forward_intermediates(
            x, indices=[k - 1], return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        out = tower(x)
        final = ref.forward_features(x)  # [N, 1 + 16, D], final norm applied
    assert tower.has_cls and tower.num_tokens == 16 and out.shape == (2, 16, 32)
    torch.testing.assert_close(out, patches, rtol=0, atol=0)
    if k == 2:
        torch.testing.assert_close(ref.norm(out), final[:, 1:], rtol=1e-6, atol=1e-6)
    cls = build_tower("timm", paths["timm_vit"], feature_layer=layer, select="cls_patch").eval()
    with torch.no_grad():
        torch.testing.assert_close(cls(x), torch.cat([prefix, patches], dim=1), rtol=0, atol=0)


def test_timm_cnn_last_feature_map_is_the_token_grid(paths):
    import timm

    ref = timm.create_model(f"local-dir:{paths['timm_cnn']}", pretrained=True).eval()
    tower = build_tower("timm", paths["timm_cnn"]).eval()  # CNN default: the last feature map
    _assert_loaded(tower.model, paths["timm_cnn"] / "model.safetensors")
    assert tv.count_params(tower) < 1_000_000
    assert tower.image_size == 64 and tower.grid == (8, 8) and tower.num_tokens == 64 and not tower.has_cls
    x = _pixels(tower)
    with torch.no_grad():
        fmap = ref.forward_features(x)  # [N, C, 8, 8]
        out = tower(x)
    assert fmap.shape == (2, 64, 8, 8) and out.shape == (2, 64, 64)
    # token t = row t // 8, column t % 8
    torch.testing.assert_close(out[:, 8 * 3 + 5], fmap[:, :, 3, 5], rtol=0, atol=0)
    torch.testing.assert_close(out, fmap.flatten(2).transpose(1, 2), rtol=0, atol=0)


def test_timm_cnn_earlier_stage(paths):
    import timm

    ref = timm.create_model(f"local-dir:{paths['timm_cnn']}", pretrained=True).eval()
    tower = build_tower("timm", paths["timm_cnn"], feature_layer=0).eval()  # the stem: stride 2
    x = _pixels(tower, 1)
    with torch.no_grad():
        stem = ref.act1(ref.bn1(ref.conv1(x)))  # [1, C, 32, 32]
        out = tower(x)
    assert tower.grid == (32, 32) and out.shape == (1, 32 * 32, stem.shape[1])
    torch.testing.assert_close(out, stem.flatten(2).transpose(1, 2), rtol=0, atol=0)


# ----- common behaviour ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend,key",
    [
        ("hf_clip", "clip"),
        ("hf_siglip", "siglip"),
        ("open_clip", "open_clip"),
        ("timm", "timm_vit"),
        ("timm", "timm_cnn"),
    ],
)
def test_wrong_image_size_is_a_clear_error(paths, backend, key):
    tower = build_tower(backend, paths[key])
    s = tower.image_size
    with pytest.raises(ValueError, match=rf"expected images of {s}x{s}, got 48x48"):
        tower(torch.zeros(1, 3, 48, 48))


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        build_tower("hf_clipp", "x")
    for name in BACKENDS:
        assert name in str(e.value)


def test_feature_layer_out_of_range(paths):
    with pytest.raises(ValueError, match="out of range"):
        build_tower("hf_clip", paths["clip"], feature_layer=3)  # 2 layers -> 3 hidden states: 0..2
    with pytest.raises(ValueError, match="select"):
        build_tower("hf_clip", paths["clip"], select="cls")


def test_dtype_and_freeze(paths):
    tower = build_tower("timm", paths["timm_vit"], dtype=torch.bfloat16).freeze()
    assert tower.dtype == torch.bfloat16 and tower.frozen and not tower.training
    out = tower(_pixels(tower))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 32)


def test_processor_facts_round_trip(paths):
    tower = build_tower("hf_siglip", paths["siglip"], image_mode="crop")
    cfg = tower.preprocess_config()
    assert cfg["size"] == 32 and cfg["mean"] == [0.5, 0.5, 0.5] and cfg["mode"] == "crop"
    code = json.loads((paths["siglip"] / "preprocessor_config.json").read_text())["resample"]
    assert cfg["resample"] == {2: "bilinear", 3: "bicubic"}[code]  # PIL's codes, read from the file
    img = Image.new("RGB", (50, 37), (10, 200, 90))
    torch.testing.assert_close(ImageProcessor(**cfg)([img]), tower.processor([img]))


# ----- MultiTower ----------------------------------------------------------------------------------
def test_two_towers_concatenate(paths):
    clip = build_tower("hf_clip", paths["clip"]).eval()  # 32 px, 4x4, 32 wide
    cnn = build_tower("timm", paths["timm_cnn"]).eval()  # 64 px, 8x8, 64 wide
    multi = MultiTower([clip, cnn]).eval()
    assert multi.hidden_size == 96 and multi.grid == (4, 4) and multi.num_tokens == 16
    assert multi.image_size == 64
    imgs = [Image.new("RGB", (80, 60), (255, 0, 0)), Image.new("RGB", (40, 70), (0, 0, 255))]
    px = multi.processor(imgs)  # [2, 3, 64, 64] in 0..1
    assert px.shape == (2, 3, 64, 64) and px.min() >= 0 and px.max() <= 1
    with torch.no_grad():
        out = multi(px)
        # each tower on its own pixels: resized to its size, normalised with its own mean/std
        small = F.interpolate(px, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
        m_c, s_c = (
            torch.tensor(clip.processor.mean).view(1, 3, 1, 1),
            torch.tensor(clip.processor.std).view(1, 3, 1, 1),
        )
        m_n, s_n = (
            torch.tensor(cnn.processor.mean).view(1, 3, 1, 1),
            torch.tensor(cnn.processor.std).view(1, 3, 1, 1),
        )
        f_clip = clip((small - m_c) / s_c)  # [2, 16, 32]
        f_cnn = cnn((px - m_n) / s_n)  # [2, 64, 64] on an 8x8 grid
    # 8x8 -> 4x4 average pooling = the mean of each 2x2 block
    g = f_cnn.reshape(2, 4, 2, 4, 2, 64).mean(dim=(2, 4)).reshape(2, 16, 64)
    assert out.shape == (2, 16, 96)
    torch.testing.assert_close(out[..., :32], f_clip, rtol=0, atol=0)
    torch.testing.assert_close(out[..., 32:], g, rtol=1e-6, atol=1e-6)


def test_multitower_rejects_cls_rows(paths):
    with pytest.raises(ValueError, match="CLS"):
        MultiTower([build_tower("hf_clip", paths["clip"], select="cls_patch")])


# ----- bad input -----------------------------------------------------------------------------------
def test_backend_and_checkpoint_mismatch_is_caught(paths):
    with pytest.raises(ValueError, match=r"model_type='siglip_vision_model'.*'hf_clip'"):
        build_tower("hf_clip", paths["siglip"])


def test_open_clip_needs_weights(tmp_path, paths):
    (tmp_path / "open_clip_config.json").write_text(
        (paths["open_clip"] / "open_clip_config.json").read_text()
    )
    with pytest.raises(FileNotFoundError, match="no weights file"):
        build_tower("open_clip", tmp_path)
    with pytest.raises(ValueError, match="pretrained="):
        build_tower("open_clip", "ViT-B-32")  # a built-in name alone would be a random tower


@pytest.mark.parametrize(
    "backend,key", [("hf_clip", "clip"), ("hf_siglip", "siglip"), ("open_clip", "open_clip")]
)
def test_dtype_for_every_backend(paths, backend, key):
    tower = build_tower(backend, paths[key], dtype=torch.bfloat16)
    assert tower.dtype == torch.bfloat16
    assert tower(_pixels(tower, 1)).dtype == torch.bfloat16


def test_multitower_needs_one_image_mode(paths):
    a = build_tower("hf_clip", paths["clip"], image_mode="pad")
    b = build_tower("hf_siglip", paths["siglip"], image_mode="crop")
    with pytest.raises(ValueError, match="same image mode"):
        MultiTower([a, b])
    multi = MultiTower([a, build_tower("hf_siglip", paths["siglip"])]).freeze()
    assert multi.frozen and multi.hidden_size == 64 and multi.grid == (4, 4)


def test_unfrozen_tower_trains(paths):
    tower = build_tower("hf_clip", paths["clip"]).train()
    tower(_pixels(tower)).square().mean().backward()
    grad = tower.model.embeddings.patch_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    last = tower.model.encoder.layers[-1].mlp.fc2.weight.grad  # after feature_layer=-2: unused
    assert last is None or last.abs().sum() == 0


def test_real_photo_through_a_tower(paths, shared_images):
    img = Image.open(shared_images / "waterview.jpg").convert("RGB")
    w, h = img.size
    assert w > h
    tower = build_tower("hf_siglip", paths["siglip"], image_mode="pad")
    px = tower.processor([img])
    assert px.shape == (1, 3, 32, 32)
    # pad mode: the image sits on a w x w canvas between two bands of (w - h) / 2 rows of the mean colour,
    # which normalises to (int(0.5 * 255) / 255 - 0.5) / 0.5 on every channel; skip the resampled edge row
    rows = int((w - h) / 2 / w * 32) - 1
    assert rows >= 2
    band = (int(0.5 * 255) / 255 - 0.5) / 0.5
    torch.testing.assert_close(px[0, :, :rows], torch.full((3, rows, 32), band), rtol=0, atol=1e-6)
    torch.testing.assert_close(px[0, :, -rows:], torch.full((3, rows, 32), band), rtol=0, atol=1e-6)
    assert (px[0, :, 10:22] - band).abs().max() > 0.1  # the photo itself
    assert tower(px).shape == (1, 16, 32)


@pytest.mark.parametrize(
    "backend,key", [("hf_clip", "clip"), ("open_clip", "open_clip"), ("timm", "timm_vit")]
)
def test_gradient_checkpointing_gives_the_same_grads(paths, backend, key):
    plain = build_tower(backend, paths[key]).train()
    ckpt = build_tower(backend, paths[key]).train()
    ckpt.gradient_checkpointing_enable()
    calls = []
    first_block = {
        "hf_clip": lambda t: t.model.encoder.layers[0],
        "open_clip": lambda t: t.model.transformer.resblocks[0],
        "timm": lambda t: t.model.blocks[0],
    }[backend](ckpt)
    # A pre-hook on the block's MLP: recomputation may stop early (after the last saved tensor), and
    # transformers checkpoints `forward`, so hooks on the block itself do not see the recompute.
    first_block.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    x = _pixels(plain)
    a, b = plain(x), ckpt(x)
    torch.testing.assert_close(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    assert len(calls) == 2  # the block ran again in backward: its activations were not kept
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_multitower_pads_with_the_largest_towers_mean(paths):
    clip = build_tower("hf_clip", paths["clip"])  # 32 px
    cnn = build_tower("timm", paths["timm_cnn"])  # 64 px: its processor leads
    multi = MultiTower([clip, cnn])
    px = multi.processor([Image.new("RGB", (64, 16), (255, 255, 255))])  # wide: bands above and below
    expect = torch.tensor([int(m * 255) / 255 for m in cnn.processor.mean])
    torch.testing.assert_close(px[0, :, 0, 0], expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(px[0, :, 32, 32], torch.ones(3), rtol=0, atol=1e-6)
