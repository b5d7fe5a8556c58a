"""Qwen-VL's vision side (ViT-bigG/14 at 448 px + a 256-query resampler), read from a Qwen-VL-Chat directory.

Contract: `QwenVLTower(dir)` reads `dir/config.json`'s `visual` dict and the `transformer.visual.*` tensors of
the checkpoint's safetensors (one file or an index); `forward(pixel_values [N, 3, S, S]) -> [N, n_queries,
output_dim]`: the resampler's rows, already at the LM's width (so the VLM's projector is `identity`).
`grid` = (g, g) with g*g = n_queries, no CLS, `feature_layer` = -1 only (the resampler reads the last block).
A missing key, a tensor of the wrong shape or a missing file is one `QwenVLError` line naming the file.

Published facts relied on (Qwen-VL's `visual.py` and config.json, written out here from their description):
- `visual`: image_size, patch_size, width, layers, heads, mlp_ratio, output_dim, n_queries (default 256);
  released: 448, 14, 1664, 48, 16, 4.9231, 4096 -> a 32x32 patch grid, MLP width int(width * mlp_ratio).
- `conv1` (Conv2d 3 -> width, kernel = stride = patch, no bias); no class token; `positional_embedding`
  [L, width] (L a square, e.g. 256) resized bicubically (align_corners=False, in fp32) to the patch grid;
  `ln_pre`; LayerNorms have eps 1e-6; GELU is the exact one.
- `transformer.resblocks.i`: x + attn(ln_1(x)), then x + mlp(ln_2(x)); `attn.in_proj` [3W, W] (+bias) lays
  q, k, v out per head (Megatron style: the output viewed as [heads, 3, head_dim]), softmax(q k^T / sqrt(d)),
  `attn.out_proj`; `mlp.c_fc` -> GELU -> `mlp.c_proj`.
- `attn_pool` (the Resampler): kv = ln_kv(kv_proj(x)) (kv_proj: Linear width -> output_dim without bias; an
  identity when they are equal), q = ln_q(query) [n_queries, output_dim]; one torch-style
  MultiheadAttention (`attn.in_proj_weight` [3E, E] = q; k; v blocks, `attn.out_proj`) with
  output_dim // 128 heads, query q + pos_embed, key kv + pos_embed resized to the patch grid, value kv.
  `pos_embed` is the 2-D sin-cos table of a g x g grid (MAE's layout) stored in the checkpoint.
- then `ln_post` (at output_dim) and `x @ proj` (proj [output_dim, output_dim], no bias).
- Preprocessing: resize to image_size x image_size, bicubic, CLIP mean / std.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..core.errors import UserError
from .base import VisionTower
from .processor import ImageProcessor

PREFIX = "transformer.visual."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISUAL_REQUIRED = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim")
LN_EPS = 1e-6


class QwenVLError(UserError, ValueError):
    """A Qwen-VL checkpoint whose vision side cannot be read; the message names the file and key."""


def resize_pos(table: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[L, C] square table -> [n_tokens, C] (bicubic on the grid, computed in fp32, as released)."""
    src, dst = math.isqrt(table.shape[0]), math.isqrt(n_tokens)
    if src == dst:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1, C, src, src]
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)  # [dst*dst, C]


def sincos_2d(dim: int, g: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table [g*g, dim]: first half from the column index, second from the row index."""
    assert dim % 4 == 0, f"sin-cos table width {dim} must divide by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64),
                                indexing="ij")

    def one(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega  # [g*g, dim/4]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()  # [g*g, dim]


class Block(nn.Module):
    """One pre-LN residual block with the per-head interleaved qkv projection."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = nn.Module()
        self.attn.in_proj = nn.Linear(width, 3 * width)
        self.attn.out_proj = nn.Linear(width, width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape  # [N, T, W]
        qkv = self.attn.in_proj(x).view(n, t, self.heads, 3, w // self.heads)  # per head: q, k, v
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [N, H, T, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, T, d]
        return self.attn.out_proj(out.transpose(1, 2).reshape(n, t, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Resampler(nn.Module):
    """n_queries learned queries cross-attend to the patch rows (Qwen-VL's `attn_pool`)."""

    def __init__(self, n_queries: int, dim: int, kv_dim: int) -> None:
        super().__init__()
        g = math.isqrt(n_queries)
        heads = dim // 128
        if g * g != n_queries or heads < 1:
            raise QwenVLError(f"visual: n_queries={n_queries} must be a square and output_dim={dim} >= 128 "
                              f"(the resampler has output_dim // 128 heads)")
        # Fixed in the release (a parameter that never trains): a buffer here, so unfreezing never trains it.
        self.register_buffer("pos_embed", sincos_2d(dim, g))  # [n_queries, dim]
        self.query = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = resize_pos(self.pos_embed, x.shape[1])  # [T, dim]
        kv = self.ln_kv(self.kv_proj(x))  # [N, T, dim]
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)  # [N, Q, dim]
        return self.attn(q, kv + pos, kv, need_weights=False)[0]  # [N, Q, dim]


class QwenVLVisual(nn.Module):
    """The vision transformer with Qwen-VL's module names (state dict keys = released names minus PREFIX)."""

    def __init__(self, cfg: dict, pos_rows: int | None = None) -> None:
        super().__init__()
        width, patch = int(cfg["width"]), int(cfg["patch_size"])
        self.grid = int(cfg["image_size"]) // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(pos_rows or self.grid**2, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width, eps=LN_EPS)
        self.transformer = nn.Module()
        mlp_width = int(width * float(cfg["mlp_ratio"]))
        self.transformer.resblocks = nn.ModuleList(
            Block(width, int(cfg["heads"]), mlp_width) for _ in range(int(cfg["layers"])))
        out_dim = int(cfg["output_dim"])
        self.attn_pool = Resampler(int(cfg.get("n_queries", 256)), out_dim, width)
        self.ln_post = nn.LayerNorm(out_dim, eps=LN_EPS)
        self.proj = nn.Parameter(torch.randn(out_dim, out_dim) * out_dim**-0.5)

    def forward(self, pixel_values: torch.Tensor, run_block=None) -> torch.Tensor:
        x = self.conv1(pixel_values)  # [N, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, W]
        x = self.ln_pre(x + resize_pos(self.positional_embedding, x.shape[1]))
        for blk in self.transformer.resblocks:
            x = blk(x) if run_block is None else run_block(blk, x)
        x = self.ln_post(self.attn_pool(x))  # [N, Q, E]
        return x @ self.proj  # [N, Q, E]


def read_visual_config(path: Path) -> dict:
    """config.json's `visual` dict, checked for the keys the tower needs."""
    file = path / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise QwenVLError(f"{file}: not readable JSON ({str(e).splitlines()[0]})") from None
    cfg = raw.get("visual") if isinstance(raw, dict) else None
    if not isinstance(cfg, dict):
        raise QwenVLError(f"{file}: no 'visual' dict; a Qwen-VL(-Chat) config.json has one")
    missing = [k for k in VISUAL_REQUIRED if k not in cfg]
    if missing:
        raise QwenVLError(f"{file}: key 'visual.{missing[0]}' is missing (needs {', '.join(VISUAL_REQUIRED)})")
    return cfg


def read_visual_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every `transformer.visual.*` tensor of the checkpoint's safetensors, names without the prefix."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith(PREFIX)})
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise QwenVLError(f"{path / name}: missing (the vision weights {PREFIX}* live there)")
        with safe_open(str(path / name), framework="pt") as f:
            out.update({k[len(PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)})
    if not out:
        raise QwenVLError(f"{path}: no {PREFIX}* tensors in its safetensors")
    return out


def load_visual(path: Path, cfg: dict) -> QwenVLVisual:
    """The vision module with the checkpoint's tensors, every name and shape checked."""
    state = read_visual_tensors(path)
    pos = state.get("positional_embedding")
    model = QwenVLVisual(cfg, pos_rows=None if pos is None else pos.shape[0])
    want = model.state_dict()
    for k in sorted(set(want) | set(state)):
        if k not in state:
            raise QwenVLError(f"{path}: tensor {PREFIX}{k} is missing")
        if k not in want:
            raise QwenVLError(f"{path}: unexpected tensor {PREFIX}{k} for config.json's 'visual'")
        if state[k].shape != want[k].shape:
            raise QwenVLError(f"{path}: {PREFIX}{k} has shape {tuple(state[k].shape)}, config.json's 'visual' "
                              f"gives {tuple(want[k].shape)}")
    model.load_state_dict(state, strict=True)
    return model


class QwenVLTower(VisionTower):
    backend = "qwenvl"

    def __init__(self, name_or_path: str, feature_layer: int | None = None, select: str = "patch",
                 image_mode: str = "resize", dtype: torch.dtype | None = None, resample: str = "bicubic") -> None:
        path = Path(name_or_path)
        if feature_layer not in (None, -1):
            raise QwenVLError(f"{path}: feature_layer={feature_layer}: the Qwen-VL tower's rows are the "
                              f"resampler's output (feature_layer -1 only)")
        if not path.is_dir():
            raise QwenVLError(f"{path}: not a directory; the qwenvl backend reads a Qwen-VL(-Chat) checkpoint")
        cfg = read_visual_config(path)
        g = math.isqrt(int(cfg.get("n_queries", 256)))
        processor = ImageProcessor(size=int(cfg["image_size"]), mean=CLIP_MEAN, std=CLIP_STD, mode=image_mode,
                                   resample=resample)
        super().__init__(name=str(path), hidden_size=int(cfg["output_dim"]), grid=(g, g), has_cls=False,
                         num_prefix=0, feature_layer=0, select=select, processor=processor)
        self.model = load_visual(path, cfg)
        if dtype is not None:
            self.model.to(dtype)

    def _hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, run_block=self.run_block)  # [N, n_queries, output_dim]
