"""Several towers at once: features concatenated along channels (Cerebras-style multi-encoder).

    multi = MultiTower([build_tower("hf_clip", a), build_tower("hf_siglip", b)])
    feats = multi(multi.processor(images))   # [N, h*w, D_a + D_b]

- Every tower must return patch tokens only (select="patch", or a tower without CLS): a CLS row has no
  grid position to align with.
- Grids are brought to the smallest one (fewest tokens) by adaptive average pooling on the 2-D grid;
  `grid` is that grid, `num_tokens` = h*w, `hidden_size` = the sum of the towers' widths.
- Pixel values: each tower needs its own size and normalisation, yet the batch carries one flat
  [N, 3, S, S] tensor. So `MultiTower.processor` produces UN-normalised pixels in 0..1 (mean 0, std 1) at
  the largest tower size S with the shared image mode; `forward` resizes them per tower (bicubic,
  antialiased) when that tower is smaller and applies the tower's own mean/std. "pad" fills with the
  largest tower's mean colour. All towers must use the
  same image mode (pad / resize / crop) so they see the same crop of the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import VisionTower
from .processor import ImageProcessor


class MultiTower(nn.Module):
    backend = "multi"
    has_cls = False
    select = "patch"

    def __init__(self, towers: Sequence[VisionTower]) -> None:
        super().__init__()
        towers = list(towers)
        if not towers:
            raise ValueError("MultiTower needs at least one tower")
        for t in towers:
            if t.num_tokens != t.grid[0] * t.grid[1]:
                raise ValueError(
                    f"MultiTower: tower {t.name} keeps a CLS row (select={t.select}); use select='patch'"
                )
        modes = {t.processor.mode for t in towers}
        if len(modes) != 1:
            raise ValueError(f"MultiTower: all towers need the same image mode, got {sorted(modes)}")
        self.towers = nn.ModuleList(towers)
        self.grid = min((t.grid for t in towers), key=lambda g: g[0] * g[1])
        self.hidden_size = sum(t.hidden_size for t in towers)
        self.image_size = max(t.image_size for t in towers)
        first = max(towers, key=lambda t: t.image_size).processor
        # 0..1 pixels: each tower normalises with its own mean/std in forward.
        self.processor = ImageProcessor(
            size=self.image_size,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            mode=first.mode,
            resample=first.resample,
            crop_pct=first.crop_pct,
            pad_color=first.mean,  # pad with the (largest) tower's mean colour, as that tower alone would
        )
        self.feature_layer = tuple(t.feature_layer for t in towers)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.towers[0].dtype

    def freeze(self) -> MultiTower:
        for t in self.towers:
            t.freeze()
        self.eval()
        return self

    @property
    def frozen(self) -> bool:
        return all(t.frozen for t in self.towers)

    def preprocess_config(self) -> dict:
        return self.processor.to_dict()

    def _tower_pixels(self, tower: VisionTower, pixels01: torch.Tensor) -> torch.Tensor:
        x = pixels01
        if tower.image_size != x.shape[-1]:
            x = F.interpolate(
                x,
                size=(tower.image_size, tower.image_size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
        mean = x.new_tensor(tower.processor.mean).view(1, 3, 1, 1)
        std = x.new_tensor(tower.processor.std).view(1, 3, 1, 1)
        return (x - mean) / std  # [N, 3, S_t, S_t]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"MultiTower: expected [N, 3, {self.image_size}, {self.image_size}] pixels in 0..1, "
                f"got {tuple(pixel_values.shape)}"
            )
        h, w = self.grid
        outs = []
        for t in self.towers:
            f = t(self._tower_pixels(t, pixel_values.float()))  # [N, ht*wt, Dt]
            if t.grid != self.grid:
                n, _, d = f.shape
                g = f.transpose(1, 2).reshape(n, d, *t.grid)  # [N, Dt, ht, wt]
                f = (
                    F.adaptive_avg_pool2d(g.float(), (h, w)).to(f.dtype).flatten(2).transpose(1, 2)
                )  # [N, h*w, Dt]
            outs.append(f)
        dtype = outs[0].dtype
        return torch.cat([o.to(dtype) for o in outs], dim=-1)  # [N, h*w, sum Dt]
