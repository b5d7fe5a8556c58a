"""open_clip vision towers (ViT image towers of CLIP / CustomTextCLIP / SigLIP-in-open_clip models).

`name_or_path`:
- a local directory in open_clip's hub format: `open_clip_config.json` ({"model_cfg", "preprocess_cfg"})
  + `open_clip_model.safetensors` (or `open_clip_pytorch_model.bin`);
- `hf-hub:org/repo` (same files on the hub);
- a built-in architecture name ("ViT-B-16") with `pretrained=` a tag ("openai") or a weights file
  (`pretrained=False`: random weights; no `pretrained` at all is an error, never a silent random tower).
Only the image tower is kept. Hidden states are numbered like transformers': 0 = patch + position
embeddings after `ln_pre` (open_clip's `_embeds`), i = output of residual block i. open_clip's
VisionTransformer always prepends one class token, so has_cls=True. Towers built on timm trunks or
ModifiedResNet are not supported here (load those through the `timm` backend).
open_clip is an optional dependency, imported when a tower is built: without it, building one raises a
UserError that names the package (importing this module, and every other backend, still works).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import UserError
from .base import VisionTower, resolve_layer
from .processor import ImageProcessor

# open_clip's inference resize modes -> ours ("squash" = plain resize, "shortest" = resize + center crop)
_MODE_OF = {"squash": "resize", "shortest": "crop", "longest": "pad"}


def _open_clip():
    """The open_clip module, or a UserError naming the package when it is not installed."""
    try:
        import open_clip  # optional dependency: only the open_clip backend needs it
    except ImportError:
        raise UserError("the open_clip vision backend needs the open_clip package: pip install "
                        "open-clip-torch (or use the hf_clip / hf_siglip / timm backend)") from None
    return open_clip


def model_id(name_or_path: str) -> str:
    """The identifier open_clip's factory understands for a path, an hf-hub id or a built-in name."""
    if Path(name_or_path).is_dir():
        if not (Path(name_or_path) / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{name_or_path}: not an open_clip directory (no open_clip_config.json)")
        weights = [f for ext in ("safetensors", "bin", "pth") for f in Path(name_or_path).glob(f"*.{ext}")]
        if not weights:
            # open_clip itself would only warn and build a random tower.
            raise FileNotFoundError(f"{name_or_path}: no weights file (open_clip_model.safetensors / *.bin)")
        return f"local-dir:{name_or_path}"
    return str(name_or_path)


class OpenCLIPTower(VisionTower):
    backend = "open_clip"

    def __init__(
        self,
        name_or_path: str,
        feature_layer: int | None = None,
        select: str = "patch",
        image_mode: str = "pad",
        dtype: torch.dtype | None = None,
        pretrained: str | bool | None = None,
        resample: str | None = None,
        **create_kw,
    ) -> None:
        open_clip = _open_clip()
        from open_clip.transformer import VisionTransformer  # optional dependency, present once imported

        ident = model_id(name_or_path)
        if not ident.startswith(("local-dir:", "hf-hub:")):
            # A built-in architecture name alone would silently give random weights.
            if pretrained is None:
                raise ValueError(
                    f"{name_or_path}: a built-in open_clip architecture needs pretrained=<tag or file> "
                    f"(tags: {open_clip.list_pretrained_tags_by_model(ident)}), or pretrained=False for "
                    f"random weights"
                )
            pretrained = pretrained or None
        clip = open_clip.create_model(ident, pretrained=pretrained, **create_kw)
        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(
                f"{name_or_path}: open_clip image tower {type(visual).__name__} is not a VisionTransformer; "
                f"use the 'timm' backend for timm trunks"
            )
        pp = dict(visual.preprocess_cfg)
        size = pp["size"]
        size = size if isinstance(size, int) else size[0]
        assert tuple(visual.image_size) == (size, size), (
            f"{name_or_path}: non-square image size {visual.image_size}"
        )
        processor = ImageProcessor(
            size=size,
            mean=pp["mean"],
            std=pp["std"],
            mode=image_mode,
            resample=resample or pp.get("interpolation", "bicubic"),
        )
        n_states = len(visual.transformer.resblocks) + 1
        super().__init__(
            name=str(name_or_path),
            hidden_size=visual.transformer.width,
            grid=visual.grid_size,
            has_cls=True,  # class_embedding is always concatenated in _embeds
            num_prefix=1,
            feature_layer=resolve_layer(
                -2 if feature_layer is None else feature_layer, n_states, name_or_path
            ),
            select=select,
            processor=processor,
        )
        self.native_resize_mode = _MODE_OF.get(pp.get("resize_mode", ""), None)
        self.model = visual  # only the image tower; the text tower is dropped with `clip`
        if dtype is not None:
            self.model.to(dtype)

    def _hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        visual = self.model
        x = visual._embeds(pixel_values)  # [N, 1 + h*w, D], hidden state 0
        tr = visual.transformer
        batch_first = getattr(tr, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)  # [T, N, D] for sequence-first blocks
        for blk in tr.resblocks[: self.feature_layer]:  # blocks after feature_layer are never run
            x = self.run_block(blk, x)
        return x if batch_first else x.transpose(0, 1)  # [N, 1 + h*w, D]
