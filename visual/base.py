"""The one interface every vision tower implements.

Contract (what `model/` relies on):
- `forward(pixel_values [N, 3, H, W]) -> [N, num_tokens, hidden_size]`; `pixel_values` come from
  `tower.processor` (already normalised with the tower's mean/std) and must be `image_size` x `image_size`,
  else a ValueError names the expected and the given size.
- `feature_layer` indexes the backend's hidden-state tuple numbered as transformers' `output_hidden_states`
  does: 0 is the embedding output, i is the output of block i, -1 the last block (for CNNs: 0 is the stem,
  i the output of stage i). `None` at build time means the backend default (-2 for ViTs, -1 for CNNs).
- `select`: "patch" drops the prefix tokens (the CLS and any register tokens) and keeps every patch;
  "cls_patch" also keeps the CLS token as the first row. A tower without a CLS (SigLIP, CNNs) never drops
  a row. "drop_first" is the BigBro repo's selection, kept only so its trained checkpoints see the
  features they were trained on (model/bigbro.py): every token but the first, whatever the first is.
  For CLIP that is the CLS (the same rows as "patch"); for SigLIP, which has no CLS, it drops a real
  patch (728 of so400m/14-384's 729 rows). Never the default; `grid` then still names the full patch grid,
  so token reduction refuses it (its `num_tokens` is not h*w).
- `grid` = (h, w) of the patch tokens (row-major); with "cls_patch" and `has_cls` the CLS comes first, then
  the h*w grid. `num_tokens` counts what `forward` returns.
- `preprocess_config()` returns the preprocessing facts (size, mean, std, mode, resample, crop_pct) so a
  checkpoint can store and rebuild the processor with `ImageProcessor(**cfg)`.
- `freeze()` / `frozen`; `gradient_checkpointing_enable()` for a tower that trains.
- Native resolution (modes "native" / "naflex", visual/native.py): a backend with `variable_grid = True`
  implements `_grid_hidden`, and `forward_grid(pixel_values [n_patches_total, 3, p, p], image_grid
  [n_images, 2]) -> [n_patches_total, D]` returns the patch rows at `feature_layer` in the same order (never a
  CLS row, whatever `select`; "drop_first" is refused). Each image's rows depend on that image only: batching
  several grids together never changes them. `patch_size` is p (0 for a backend without the path).
`VisionTower` is an abstract base class: a backend subclasses it, sets `backend` (its key in
`visual.registry.BACKENDS`), passes the facts above to `__init__`, and must implement the one abstract method
`_hidden_state(pixel_values) -> [N, num_prefix + h*w, D]` at `feature_layer` (a backend without it cannot be
instantiated). Checking inputs and selecting tokens stay here, the same for every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .native import check_grid_batch
from .processor import ImageProcessor

SELECT_MODES = ("patch", "cls_patch", "drop_first")


def resolve_layer(feature_layer: int, n_states: int, what: str) -> int:
    """Map a (possibly negative) index into a hidden-state tuple of length `n_states` to 0..n_states-1."""
    if not -n_states <= feature_layer < n_states:
        raise ValueError(
            f"{what}: feature_layer={feature_layer} is out of range; the model has {n_states} hidden states "
            f"(valid: {-n_states}..{n_states - 1}, 0 = embedding output)"
        )
    return feature_layer % n_states


class VisionTower(nn.Module, ABC):
    """Abstract base: holds the facts, checks inputs, selects tokens. Backends implement `_hidden_state`."""

    backend: str = "base"
    variable_grid: bool = False  # has `_grid_hidden`: native / naflex resolution (forward_grid)
    patch_size: int = 0  # pixels per patch side; backends with `variable_grid` set it

    def __init__(
        self,
        *,
        name: str,
        hidden_size: int,
        grid: tuple[int, int],
        has_cls: bool,
        num_prefix: int,
        feature_layer: int,
        select: str,
        processor: ImageProcessor,
    ) -> None:
        super().__init__()
        if select not in SELECT_MODES:
            raise ValueError(f"{name}: select={select!r} is not one of {SELECT_MODES}")
        assert num_prefix >= int(has_cls), f"{name}: has_cls=True needs at least one prefix token"
        self.name = name
        self.hidden_size = int(hidden_size)
        self.grid = (int(grid[0]), int(grid[1]))
        self.has_cls = bool(has_cls)
        self.num_prefix = int(num_prefix)  # tokens before the patch grid: CLS, registers
        self.feature_layer = int(feature_layer)  # already resolved to 0..n_states-1
        self.select = select
        self.processor = processor
        self.image_size = processor.size
        self.grad_checkpointing = False

    # ----- facts -------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        if self.select == "drop_first":
            return self.num_prefix + self.grid[0] * self.grid[1] - 1
        keep_cls = self.select == "cls_patch" and self.has_cls
        return self.grid[0] * self.grid[1] + int(keep_cls)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def preprocess_config(self) -> dict:
        return self.processor.to_dict()

    def gradient_checkpointing_enable(self) -> None:
        """Recompute block activations in backward (only matters for a trained, unfrozen tower)."""
        self.grad_checkpointing = True

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One transformer block, checkpointed when enabled and gradients are being recorded."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def freeze(self) -> VisionTower:
        self.requires_grad_(False)
        self.eval()
        return self

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    # ----- forward -----------------------------------------------------------------------------------
    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"{self.name}: pixel_values must be [N, 3, H, W], got shape {tuple(pixel_values.shape)}"
            )
        got = tuple(pixel_values.shape[-2:])
        if got != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.name}: expected images of {self.image_size}x{self.image_size}, got {got[0]}x{got[1]} "
                f"(use tower.processor to resize)"
            )

    @abstractmethod
    def _hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalised pixels -> [N, num_prefix + h*w, D], the hidden state at `feature_layer`."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixel_values)
        hidden = self._hidden_state(pixel_values.to(self.dtype))  # [N, num_prefix + h*w, D]
        n_grid = self.grid[0] * self.grid[1]
        # Loud check: a wrong has_cls / prefix count would silently drop a patch or keep a CLS as a patch.
        assert hidden.shape[1] == self.num_prefix + n_grid, (
            f"{self.name}: backend returned {hidden.shape[1]} tokens, expected {self.num_prefix} prefix + "
            f"{n_grid} patches"
        )
        assert hidden.shape[2] == self.hidden_size, (
            f"{self.name}: width {hidden.shape[2]} != {self.hidden_size}"
        )
        if self.select == "drop_first":  # the BigBro repo's rows: token 0 goes, CLS or not
            return hidden[:, 1:]  # [N, prefix + h*w - 1, D]
        patches = hidden[:, self.num_prefix :]  # [N, h*w, D]
        if self.select == "cls_patch" and self.has_cls:
            return torch.cat([hidden[:, :1], patches], dim=1)  # [N, 1 + h*w, D]
        return patches

    def _grid_hidden(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        """[n_patches_total, 3, p, p] + image_grid [n_images, 2] -> patch rows [n_patches_total, D]."""
        raise NotImplementedError(f"{self.name}: backend {self.backend!r} has no native-resolution path")

    def forward_grid(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        """Variable grids (visual/native.py's batch contract) -> [n_patches_total, D], rows in input order."""
        if not self.variable_grid:
            raise ValueError(f"{self.name}: backend {self.backend!r} reads fixed {self.image_size}px crops only; "
                             f"native / naflex resolution needs hf_clip, hf_siglip, hf_siglip2 or a timm CNN")
        if self.select == "drop_first":
            raise ValueError(f"{self.name}: select=drop_first has no native-resolution meaning; use select=patch")
        check_grid_batch(pixel_values, image_grid, self.patch_size, self.name)
        if image_grid.shape[0] == 0:  # a batch without images
            return pixel_values.new_zeros(0, self.hidden_size, dtype=self.dtype)
        rows = self._grid_hidden(pixel_values.to(self.dtype), image_grid.to(torch.long))  # [P, D]
        assert rows.shape == (pixel_values.shape[0], self.hidden_size), (
            f"{self.name}: native path returned {tuple(rows.shape)}, expected "
            f"({pixel_values.shape[0]}, {self.hidden_size})"
        )
        return rows

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend}, name={self.name!r}, image_size={self.image_size}, grid={self.grid}, "
            f"hidden_size={self.hidden_size}, has_cls={self.has_cls}, feature_layer={self.feature_layer}, "
            f"select={self.select}"
        )
