"""The one registry of tower backends (`BACKENDS`) and `build_tower`, the one entry point `model/` uses.

`BACKENDS` maps a backend name to its `VisionTower` subclass (visual/base.py, an abstract base class). It is
filled here and only here, by the explicit imports below: a new backend is a module with one subclass plus
one line in `BACKENDS`; importing a backend module registers nothing.

    tower = build_tower("hf_siglip", "google/siglip-so400m-patch14-384")          # hub id
    tower = build_tower("timm", "/ckpt/my_resnet", feature_layer=-1, dtype=torch.bfloat16)  # local dir

`feature_layer=None` picks the backend default (-2 for ViTs as LLaVA does, -1 for timm CNNs). Extra
keyword arguments go to the backend (e.g. `dtype`, `resample`, open_clip's `pretrained` tag, timm's
`pretrained=False` or `create_model` kwargs).
"""

from __future__ import annotations

from .base import VisionTower
from .hf import HFCLIPTower, HFSiglip2Tower, HFSiglipTower
from .openclip import OpenCLIPTower
from .qwenvl import QwenVLTower
from .timm_tower import TimmTower

BACKENDS: dict[str, type[VisionTower]] = {
    "hf_clip": HFCLIPTower,
    "hf_siglip": HFSiglipTower,
    "hf_siglip2": HFSiglip2Tower,
    "open_clip": OpenCLIPTower,
    "qwenvl": QwenVLTower,  # Qwen-VL(-Chat)'s ViT + resampler, read from its checkpoint
    "timm": TimmTower,
}


def build_tower(
    backend: str,
    name_or_path: str,
    feature_layer: int | None = None,
    select: str = "patch",
    image_mode: str = "pad",
    **kw,
) -> VisionTower:
    """Build a tower of `backend` from a hub id or a local directory in that backend's native format."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown vision backend {backend!r}; valid backends: {sorted(BACKENDS)}")
    return BACKENDS[backend](
        str(name_or_path), feature_layer=feature_layer, select=select, image_mode=image_mode, **kw
    )
