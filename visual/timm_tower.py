"""timm vision towers: ViTs (timm's VisionTransformer family) and CNNs.

`name_or_path`: a local directory in timm's hub format (`config.json` with "architecture"/"model_args"/
"pretrained_cfg" + `model.safetensors`), an `hf-hub:org/repo` id, or a timm model name (pretrained weights
unless `pretrained=False`). Extra keyword arguments go to `timm.create_model`.
- ViT (an instance of timm's VisionTransformer, e.g. vit_*, deit_*): hidden state 0 = patch embedding
  + position embedding (+ prefix tokens) after `norm_pre`, i = output of block i. `has_cls` is the
  model's `has_class_token`; register tokens are prefix tokens too and are never returned.
- CNN (anything else with `forward_intermediates`): hidden states are timm's feature list (for ResNets:
  0 = stem, i = stage i); the chosen map [N, C, h, w] becomes h*w tokens, row-major. has_cls=False.
  The default feature_layer for a CNN is -1 (the last feature map). A CNN also reads images at their own
  size (native resolution, `forward_grid`): `patch_size` is its total stride at that feature map
  (input side / grid side), and an image of (gh*p) x (gw*p) pixels gives a gh x gw map.
Preprocessing facts come from timm's data config (input size, mean, std, interpolation, crop_pct).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from .base import VisionTower, resolve_layer
from .native import run_by_grid
from .processor import ImageProcessor


def model_id(name_or_path: str) -> str:
    """The identifier timm.create_model understands for a local dir, an hf-hub id or a model name."""
    if Path(name_or_path).is_dir():
        if not (Path(name_or_path) / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path}: not a timm model directory (no config.json)")
        return f"local-dir:{name_or_path}"
    return str(name_or_path)


class TimmTower(VisionTower):
    backend = "timm"

    def __init__(
        self,
        name_or_path: str,
        feature_layer: int | None = None,
        select: str = "patch",
        image_mode: str = "pad",
        dtype: torch.dtype | None = None,
        pretrained: bool = True,
        resample: str | None = None,
        **create_kw,
    ) -> None:
        model = timm.create_model(model_id(name_or_path), pretrained=pretrained, num_classes=0, **create_kw)
        data = timm.data.resolve_model_data_config(model)
        _, h, w = data["input_size"]
        if h != w:
            raise ValueError(f"{name_or_path}: only square inputs are supported, timm says {h}x{w}")
        processor = ImageProcessor(
            size=h,
            mean=data["mean"],
            std=data["std"],
            mode=image_mode,
            resample=resample or data.get("interpolation", "bicubic"),
            crop_pct=min(1.0, float(data.get("crop_pct", 1.0))),
        )
        is_vit = isinstance(model, VisionTransformer)
        if is_vit:
            n_states = len(model.blocks) + 1
            layer = resolve_layer(-2 if feature_layer is None else feature_layer, n_states, name_or_path)
            grid = tuple(model.patch_embed.grid_size)
            hidden, has_cls, prefix = (
                model.embed_dim,
                bool(model.has_class_token),
                int(model.num_prefix_tokens),
            )
            if tuple(model.patch_embed.img_size) != (h, h):
                raise ValueError(
                    f"{name_or_path}: data config size {h} != patch_embed size {model.patch_embed.img_size}"
                )
        else:
            if not hasattr(model, "forward_intermediates"):
                raise NotImplementedError(
                    f"{name_or_path}: timm model {type(model).__name__} has no forward_intermediates"
                )
            # The feature list's length and the chosen map's shape are learned from one dry run, in eval
            # mode so BatchNorm running statistics are not touched.
            was_training = model.training
            model.eval()
            with torch.no_grad():
                feats = model.forward_intermediates(torch.zeros(1, 3, h, h), intermediates_only=True)
            model.train(was_training)
            n_states = len(feats)
            layer = resolve_layer(-1 if feature_layer is None else feature_layer, n_states, name_or_path)
            fmap = feats[layer]  # [1, C, h', w']
            assert fmap.ndim == 4, (
                f"{name_or_path}: feature {layer} is not a [N, C, h, w] map: {tuple(fmap.shape)}"
            )
            grid, hidden, has_cls, prefix = tuple(fmap.shape[-2:]), fmap.shape[1], False, 0
        super().__init__(
            name=str(name_or_path),
            hidden_size=hidden,
            grid=grid,
            has_cls=has_cls,
            num_prefix=prefix,
            feature_layer=layer,
            select=select,
            processor=processor,
        )
        self.is_vit = is_vit
        self.model = model
        # A CNN reads any size: native resolution with one "patch" per output cell (its total stride).
        self.variable_grid = not is_vit and h % grid[0] == 0 and h // grid[0] == h // grid[1]
        self.patch_size = h // grid[0] if self.variable_grid else 0
        if dtype is not None:
            self.model.to(dtype)

    def gradient_checkpointing_enable(self) -> None:
        super().gradient_checkpointing_enable()  # ViT blocks: run_block
        if not self.is_vit:
            self.model.set_grad_checkpointing(True)  # CNN stages: timm's own checkpointing

    def _grid_hidden(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        """A CNN at each image's own (H, W): its output map is (H / stride) x (W / stride) cells."""
        return run_by_grid(pixel_values, image_grid, self._hidden_state)  # [n_patches_total, C]

    def _hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.is_vit:
            x = m.patch_embed(pixel_values)  # [N, h*w, D] (timm ViTs flatten by default)
            x = m._pos_embed(x)  # [N, prefix + h*w, D]
            x = m.patch_drop(x)
            x = m.norm_pre(x)  # hidden state 0
            for blk in m.blocks[: self.feature_layer]:
                x = self.run_block(blk, x)
            return x
        fmap = m.forward_intermediates(
            pixel_values, indices=[self.feature_layer], intermediates_only=True, stop_early=True
        )[0]
        return fmap.flatten(2).transpose(1, 2)  # [N, C, h, w] -> [N, h*w, C]
