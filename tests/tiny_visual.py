"""Tiny random vision towers saved in each backend's NATIVE format, for tests and the offline demo.

Each `save_tiny_*(dir)` builds a random model (hidden 32-64, 2 layers, 32/64 px), writes it to `dir` the
way that library's own hub format lays it out, and returns the directory, so tests load it through the
real loading code: `visual.build_tower(backend, path)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIZE = 32  # default image size of the tiny ViTs; patch 8 -> a 4x4 grid
PATCH = 8


def _dir(path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def save_tiny_clip(
    path, image_size: int = SIZE, patch_size: int = PATCH, hidden: int = 32, layers: int = 2
) -> Path:
    """transformers CLIPVisionModel dir (config.json, model.safetensors, preprocessor_config.json)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    p = _dir(path)
    cfg = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    CLIPVisionModel(cfg).save_pretrained(p)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(p)
    return p


def save_tiny_siglip(
    path, image_size: int = SIZE, patch_size: int = PATCH, hidden: int = 32, layers: int = 2
) -> Path:
    """transformers SiglipVisionModel dir (config.json, model.safetensors, preprocessor_config.json)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    p = _dir(path)
    cfg = SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    SiglipVisionModel(cfg).save_pretrained(p)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(p)
    return p


def save_tiny_siglip2(
    path, num_patches: int = 16, patch_size: int = PATCH, hidden: int = 32, layers: int = 2
) -> Path:
    """transformers Siglip2VisionModel dir; used at sqrt(num_patches) * patch_size px (32 by default)."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    p = _dir(path)
    cfg = Siglip2VisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_patches=num_patches,
        patch_size=patch_size,
    )
    Siglip2VisionModel(cfg).save_pretrained(p)
    return p


def save_tiny_open_clip(
    path, image_size: int = SIZE, patch_size: int = PATCH, width: int = 32, layers: int = 2
) -> Path:
    """open_clip hub-format dir: open_clip_config.json ({"model_cfg", "preprocess_cfg"}) and
    open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    p = _dir(path)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "patch_size": patch_size,
            "head_width": 16,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    }
    preprocess_cfg = {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (p / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    )
    model = open_clip.create_model(f"local-dir:{p}", load_weights=False)  # random init from that config
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(p / "open_clip_model.safetensors")
    )
    return p


def _save_timm(model, p: Path, model_args: dict) -> Path:
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(p), model_args=model_args, safe_serialization=True)
    return p


def save_tiny_timm_vit(
    path, image_size: int = SIZE, patch_size: int = PATCH, embed_dim: int = 32, depth: int = 2
) -> Path:
    """timm hub-format dir (config.json + model.safetensors) of a vit_tiny-shaped ViT with a CLS token."""
    import timm

    args = dict(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=2,
        num_classes=0,
    )
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    return _save_timm(model, _dir(path), args)


def save_tiny_timm_cnn(path, image_size: int = 64, width: int = 8) -> Path:
    """timm hub-format dir of resnet10t at reduced width (channels w, 2w, 4w, 8w) and output stride 8:
    its last feature map is image_size/8 per side (8x8 on 64 px), at about 0.1M parameters."""
    import timm

    args = dict(
        channels=(width, 2 * width, 4 * width, 8 * width), stem_width=width, output_stride=8, num_classes=0
    )
    model = timm.create_model("resnet10t", pretrained=False, **args)
    # timm records the default 224 input; the tower's size is part of the data config, so store ours.
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "input_size": (3, image_size, image_size),
        "crop_pct": 1.0,
    }
    return _save_timm(model, _dir(path), args)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
