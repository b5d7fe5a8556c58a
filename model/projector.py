"""Projectors from vision features to LM embeddings, with optional token reduction in front.

Contract: `build_projector(kind, in_dim, out_dim, reduce=None, reduce_factor=1, grid=None)` returns a
`Projector` mapping `[N, T, in_dim]` -> `[N, tokens_out(T), out_dim]`.

- `kind` is parsed with one regex per family (`PROJECTOR_KINDS`): `linear`, `identity` (asserts
  in == out), `mlp{N}x_gelu` for N >= 1 Linear layers with GELU between them. `mlp2x_gelu` is
  LLaVA-1.5's: Linear(in, out), GELU, Linear(out, out).
- `reduce` shrinks the token grid by a factor s before the MLP (`REDUCTIONS`):
  `pixel_shuffle` turns h x w x C into h/s x w/s x C*s^2 (so the MLP's input width grows by s^2),
  `avg_pool` averages s x s blocks (width unchanged). `grid=(h, w)` is the token grid; when it is
  None the grid is taken as square from T at run time. Reduction needs T == h * w exactly (no CLS).
- Module names are stable for checkpoints: the MLP layers are `mlp.0`, `mlp.2`, ... (GELUs between).
- Variable grids (native resolution, model/native.py): `pixel_shuffle_grids(rows [P, C], grids, s)` merges
  each image's own grid, one `pixel_shuffle` per distinct grid; `Projector.project_rows` is the MLP alone on
  already-reduced rows [T, mlp_in_dim].
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..visual.native import grid_groups, row_offsets

REDUCTIONS = ("pixel_shuffle", "avg_pool")


def _square_grid(n_tokens: int) -> tuple[int, int]:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(
            f"token reduction needs a square token grid when grid=None, got {n_tokens} tokens "
            f"(a CLS token left in? use select='patch')"
        )
    return side, side


def _check_grid(grid: tuple[int, int], s: int) -> None:
    h, w = grid
    if h % s or w % s:
        raise ValueError(f"token grid {h}x{w} is not divisible by reduce_factor {s}")


def pixel_shuffle(x: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """[N, h*w, C] -> [N, (h/s)*(w/s), C*s*s]; each output token stacks an s x s block row-major."""
    n, t, c = x.shape
    h, w = grid
    assert t == h * w, f"pixel_shuffle: {t} tokens do not form the {h}x{w} grid"
    x = x.reshape(n, h // s, s, w // s, s, c)  # [N, h', s, w', s, C]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [N, h', w', s, s, C]
    return x.reshape(n, (h // s) * (w // s), s * s * c)


def pixel_shuffle_grids(x: torch.Tensor, grids: list[tuple[int, int]], s: int) -> torch.Tensor:
    """[P, C] rows of images with their own (h, w) grids (images consecutive) -> [sum (h/s)*(w/s), C*s*s].
    Each image is shuffled alone (`pixel_shuffle`: Qwen2-VL's merge order), so its rows never see another's."""
    start = row_offsets(grids)
    if start[-1] != x.shape[0]:
        raise ValueError(f"pixel_shuffle_grids: grids {grids} cover {start[-1]} rows, got {x.shape[0]}")
    pieces: list[torch.Tensor] = [x[:0].reshape(0, x.shape[1] * s * s)] * len(grids)
    for (h, w), idx in grid_groups(grids).items():
        _check_grid((h, w), s)
        group = torch.stack([x[start[i] : start[i + 1]] for i in idx])  # [k, h*w, C]
        merged = pixel_shuffle(group, (h, w), s)  # [k, (h/s)*(w/s), C*s*s]
        for j, i in enumerate(idx):
            pieces[i] = merged[j]
    return torch.cat(pieces) if pieces else x.new_zeros(0, x.shape[1] * s * s)  # [T, C*s*s]


def avg_pool(x: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """[N, h*w, C] -> [N, (h/s)*(w/s), C]: mean over each s x s block."""
    n, t, c = x.shape
    h, w = grid
    assert t == h * w, f"avg_pool: {t} tokens do not form the {h}x{w} grid"
    x = x.transpose(1, 2).reshape(n, c, h, w)  # [N, C, h, w]
    x = F.avg_pool2d(x, kernel_size=s, stride=s)  # [N, C, h/s, w/s]
    return x.flatten(2).transpose(1, 2)  # [N, h'*w', C]


def _mlp_gelu(n_layers: int, in_dim: int, out_dim: int) -> list[nn.Module]:
    if n_layers < 1:
        raise ValueError(f"mlp{n_layers}x_gelu: need at least 1 Linear layer")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(n_layers - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return layers


def _linear(in_dim: int, out_dim: int) -> list[nn.Module]:
    return [nn.Linear(in_dim, out_dim)]


def _identity(in_dim: int, out_dim: int) -> list[nn.Module]:
    if in_dim != out_dim:
        raise ValueError(f"identity projector needs in_dim == out_dim, got in_dim={in_dim} out_dim={out_dim}")
    return []


# Registry: regex over the kind name -> builder(match, in_dim, out_dim) returning the layer list.
PROJECTOR_KINDS: dict[str, tuple[str, object]] = {
    "linear": (r"linear", lambda m, i, o: _linear(i, o)),
    "identity": (r"identity", lambda m, i, o: _identity(i, o)),
    "mlpNx_gelu": (r"mlp(\d+)x_gelu", lambda m, i, o: _mlp_gelu(int(m.group(1)), i, o)),
}


class Projector(nn.Module):
    """Optional token reduction, then the MLP. `in_dim` is the tower width before reduction."""

    def __init__(
        self,
        kind: str,
        in_dim: int,
        out_dim: int,
        reduce: str | None = None,
        reduce_factor: int = 1,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if reduce is not None and reduce not in REDUCTIONS:
            raise ValueError(f"unknown token reduction {reduce!r}; valid: {', '.join(REDUCTIONS)} or None")
        if reduce_factor < 1:
            raise ValueError(f"reduce_factor must be >= 1, got {reduce_factor}")
        if reduce is None and reduce_factor != 1:
            raise ValueError(f"reduce_factor={reduce_factor} given without reduce (pixel_shuffle|avg_pool)")
        if grid is not None:
            grid = (int(grid[0]), int(grid[1]))
            if reduce is not None:
                _check_grid(grid, reduce_factor)
        self.kind, self.in_dim, self.out_dim = kind, in_dim, out_dim
        self.reduce, self.reduce_factor, self.grid = reduce, reduce_factor, grid
        # Pixel-shuffle stacks s*s neighbours into the channel dimension, so the MLP sees in_dim*s^2.
        self.mlp_in_dim = in_dim * reduce_factor**2 if reduce == "pixel_shuffle" else in_dim
        for pattern, builder in PROJECTOR_KINDS.values():
            match = re.fullmatch(pattern, kind)
            if match:
                self.mlp = nn.Sequential(*builder(match, self.mlp_in_dim, out_dim))
                break
        else:
            raise ValueError(
                f"unknown projector kind {kind!r}; valid: linear, identity, mlp<N>x_gelu (e.g. mlp2x_gelu)"
            )

    def tokens_out(self, n_tokens: int) -> int:
        """Tokens per image after reduction."""
        if self.reduce is None:
            return n_tokens
        grid = self.grid or _square_grid(n_tokens)
        if grid[0] * grid[1] != n_tokens:
            raise ValueError(f"projector grid {grid[0]}x{grid[1]} does not hold {n_tokens} tokens")
        _check_grid(grid, self.reduce_factor)
        return (grid[0] // self.reduce_factor) * (grid[1] // self.reduce_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, T, in_dim]
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects width {self.in_dim}, got features of width {x.shape[-1]}")
        if self.reduce is not None:
            grid = self.grid or _square_grid(x.shape[1])
            _check_grid(grid, self.reduce_factor)
            fn = pixel_shuffle if self.reduce == "pixel_shuffle" else avg_pool
            x = fn(x, grid, self.reduce_factor)  # [N, T', mlp_in_dim]
        return self.mlp(x)  # [N, T', out_dim]

    def project_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP alone on rows already reduced: [T, mlp_in_dim] -> [T, out_dim]."""
        if x.shape[-1] != self.mlp_in_dim:
            raise ValueError(f"projector MLP expects width {self.mlp_in_dim}, got rows of width {x.shape[-1]}")
        return self.mlp(x)

    def extra_repr(self) -> str:
        reduce = f"{self.reduce}x{self.reduce_factor}" if self.reduce else "None"
        return f"kind={self.kind}, in_dim={self.in_dim}, out_dim={self.out_dim}, reduce={reduce}"


def build_projector(
    kind: str,
    in_dim: int,
    out_dim: int,
    reduce: str | None = None,
    reduce_factor: int = 1,
    grid: tuple[int, int] | None = None,
) -> Projector:
    """Build a projector by name; see the module docstring for kinds and reductions."""
    return Projector(kind, in_dim, out_dim, reduce=reduce, reduce_factor=reduce_factor, grid=grid)
