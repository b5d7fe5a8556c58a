"""FLOPs of a training step and the machine's matmul peak, counted analytically from the model and the batch.

They live in model/ (not trainer/) because both the memory/compute plan (model/plan.py) and the training
run's throughput logging (trainer/throughput.py) count with them, and the plan sits below the trainer.

`step_flops(dims, stats)`: the FLOPs of one training micro-batch (`ModelDims.from_model(vlm)`, `batch_stats(batch)`).
Per part, a matmul weight of P parameters applied to n tokens costs 2·P·n forward, 2·P·n more for the
gradient of its input (only when a trainable parameter lies before it, so the gradient must flow through)
and 2·P·n for the gradient of the weight (only when the weight trains): `m·P·n` with
m = 2 + 2·[gradient flows through] + 2·[weight trains] (6 for a trained part, the usual 6·N·tokens).
- towers: every matmul/conv weight of the tower(s) (embeddings and norms excluded) on
  t_v = grid_h·grid_w (+1 CLS) tokens per image, plus attention scores and values
  4·L_v·d_v·t_v² per image forward (x3 when the tower trains); n = images in the batch whose tower
  runs (cached features skip it). Exact for ViTs; a CNN tower's convolutions are counted once per
  output token, an underestimate;
- projector: its weights on `tokens_per_image` tokens per image;
- variable patch grids (native / NaFlex resolution: the batch holds `image_grid` [n_images, 2] and
  `pixel_values` rows are patches): the tower's weights on every patch (+ its CLS row per image, CLIP) and
  attention 4·L_v·d_v·(h·w + cls)² per image; the projector on the patches / merge² rows it receives.
  NaFlex pads each image to `max_num_patches` and masks the rest: the padding is not counted (model FLOPs).
  Anyres crops are square tower inputs: counted as images (every crop, base view included, runs the tower
  and the projector; unpadding only drops rows afterwards);
- LM body: every linear weight of the LM except the output head, on T = the real (unpadded, or packed)
  tokens of the batch; attention 4·L·d_attn·s² forward per sample of length s (full square, as PaLM's
  MFU convention; not halved for causality) and x3 (12·L·d·s²) when the gradient flows through;
- LM head: V·H on the supervised positions only (labels != -100 after the shift): the logits a training
  step needs (an implementation that computes all logits does more work than the model needs).
Embedding lookups, norms, activations, rotary and the loss are not counted (few FLOPs next to the
matmuls, however long they may take on a bandwidth-bound machine).

MFU (trainer/throughput.py) = counted FLOPs per second of wall time / `peak_matmul_flops(device, dtype)`,
the best of a few square matmuls measured once per process on this device and dtype (cached), so MFU is relative to what
this machine actually reaches, not a data-sheet number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.loss import count_targets

_PEAK_CACHE: dict[tuple[str, str], float] = {}


# ----- the machine ------------------------------------------------------------------------------------
# Square matmul sizes the peak is the best of: on a CPU a 1024 matmul is too short to reach the BLAS
# peak on some machines (85 vs 150 GFLOP/s measured on a 2-core AVX2 EPYC), 2048 reaches it.
PEAK_SIZES = {"cpu": (1024, 2048), "cuda": (4096, 8192)}


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        sizes: tuple[int, ...] | None = None, repeats: int = 4) -> tuple[float, float]:
    """(best wall FLOP/s, best CPU-time FLOP/s) of `repeats` square matmuls of each of `sizes` (default
    `PEAK_SIZES` for the device type) on `device` in `dtype`, measured now. CPU time tells a busy machine
    (wall time well above it) from a slow one."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)  # private: training's RNG streams stay untouched
    wall = cpu = 0.0
    for n in sizes or PEAK_SIZES.get(device.type, PEAK_SIZES["cpu"]):
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        torch.mm(a, b)  # warm-up (BLAS threads, kernels)
        sync()
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            torch.mm(a, b)
            sync()
            flop = 2 * n**3
            wall = max(wall, flop / (time.perf_counter() - t0))
            cpu = max(cpu, flop / max(time.process_time() - c0, 1e-9))
    return wall, cpu


def peak_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      size: int | None = None, repeats: int = 4) -> float:
    """Best wall FLOP/s of `measure_matmul_peak` (`size`, else each of `PEAK_SIZES`) on `device` in `dtype`,
    measured once per process, then cached."""
    device = torch.device(device)
    key = (str(device), str(dtype))
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = measure_matmul_peak(device, dtype, (size,) if size else None, repeats)[0]
    return _PEAK_CACHE[key]


# ----- the model --------------------------------------------------------------------------------------
def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also when ZeRO-3 has partitioned it away (`ds_shape`)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _trains(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


def _matmul_weights(module: nn.Module, skip: set[int] = frozenset()) -> list[tuple[int, bool]]:
    """(parameter count, trains) of every Linear / Conv weight under `module`, except ids in `skip`."""
    out = []
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and id(m.weight) not in skip:
            out.append((_numel(m.weight), m.weight.requires_grad))
    return out


def _weights_flops_per_token(weights: list[tuple[int, bool]], grad_flows: bool) -> int:
    return sum((2 + 2 * grad_flows + 2 * trains) * n for n, trains in weights)


def _config(module: nn.Module):
    cfg = getattr(module, "config", None)
    if cfg is None and hasattr(module, "get_base_model"):  # peft wrapper
        cfg = getattr(module.get_base_model(), "config", None)
    return cfg


def _tower_list(towers: nn.Module) -> list[nn.Module]:
    inner = getattr(towers, "towers", None)  # visual.MultiTower
    return list(inner) if isinstance(inner, nn.ModuleList | list) else [towers]


def _vit_attention(tower: nn.Module) -> tuple[int, int]:
    """(layers, width) of a ViT tower's attention, (0, 0) for a CNN."""
    backbone = getattr(tower, "model", tower)
    cfg = getattr(backbone, "config", None)
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):  # transformers CLIP / SigLIP
        return int(cfg.num_hidden_layers), int(cfg.hidden_size)
    blocks = getattr(backbone, "blocks", None)  # timm ViT
    if blocks is not None and hasattr(backbone, "embed_dim"):
        return len(blocks), int(backbone.embed_dim)
    visual = getattr(backbone, "visual", backbone)  # open_clip
    tr = getattr(visual, "transformer", None)
    if tr is not None and hasattr(tr, "resblocks"):
        return len(tr.resblocks), int(tr.width)
    return 0, 0


@dataclass
class ModelDims:
    """What `step_flops` needs from the model, read once (after the trainable set is decided)."""

    tower_per_image: int  # FLOPs per image, weights and attention, with the tower's multipliers
    projector_per_image: int
    lm_per_token: int  # LM body weights
    lm_attention: int  # factor f: attention FLOPs = f * sum(s^2) over samples
    head_per_target: int
    parts: dict = field(default_factory=dict)  # the counts behind the figures, for inspection
    tower_per_patch: int = 0  # variable grids: tower weights per patch
    tower_attention: int = 0  # variable grids: factor f, attention FLOPs = f * sum((h*w)^2) over images
    projector_per_row: int = 0  # variable grids: projector weights per row it receives
    merge: int = 1  # native resolution: merge x merge patches -> one projector row
    # variable grids, per tower: (weight FLOPs per row, attention factor, prefix rows per image (CLS))
    grid_towers: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def from_model(cls, vlm: nn.Module) -> ModelDims:
        towers, projector, lm = vlm.towers, vlm.projector, vlm.lm
        tower_trains, proj_trains = _trains(towers), _trains(projector)
        tower_total = per_patch = attention = 0
        grid_towers = []
        for tower in _tower_list(towers):
            cls_rows = int(bool(getattr(tower, "has_cls", False)))
            t_v = int(tower.grid[0] * tower.grid[1]) + cls_rows
            weights = _matmul_weights(tower)
            mult = _weights_flops_per_token(weights, grad_flows=False)  # nothing trains before a tower
            layers, width = _vit_attention(tower)
            tower_total += mult * t_v + (12 if tower_trains else 4) * layers * width * t_v**2
            per_patch += mult
            attention += (12 if tower_trains else 4) * layers * width
            grid_towers.append((mult, (12 if tower_trains else 4) * layers * width, cls_rows))
        n_proj = sum(n for n, _ in _matmul_weights(projector))
        proj_mult = (6 if proj_trains else 2 + 2 * tower_trains) * n_proj
        proj_per_image = proj_mult * int(vlm.tokens_per_image)
        res = getattr(vlm, "resolution", None)
        merge = int(res.merge) if res is not None and res.mode == "native" else 1

        head = lm.get_output_embeddings()
        body = _matmul_weights(lm, skip={id(head.weight)})
        # The gradient flows through the LM when anything in front of its output trains.
        grad_flows = tower_trains or proj_trains or any(t for _, t in body)
        cfg = _config(lm)
        layers = int(cfg.num_hidden_layers)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        d_attn = int(cfg.num_attention_heads) * int(head_dim)
        v, h = _shape(head.weight)
        head_mult = 2 + 2 * grad_flows + 2 * head.weight.requires_grad
        return cls(
            tower_per_image=tower_total,
            projector_per_image=proj_per_image,
            lm_per_token=_weights_flops_per_token(body, grad_flows),
            lm_attention=(12 if grad_flows else 4) * layers * d_attn,
            head_per_target=head_mult * v * h,
            tower_per_patch=per_patch, tower_attention=attention, projector_per_row=proj_mult, merge=merge,
            grid_towers=tuple(grid_towers),
            parts={"lm_body_params": sum(n for n, _ in body), "head_params": v * h, "projector_params": n_proj,
                   "lm_layers": layers, "lm_attn_width": d_attn, "grad_through_lm": grad_flows},
        )


@dataclass
class BatchStats:
    samples: int
    lengths: list[int]  # real tokens per sample (packed: per packed sample)
    targets: int
    images: int  # images (anyres: crops) whose tower runs
    projected: int  # images whose features go through the projector (cached features included)
    patches: int = 0  # variable grids: patches the tower reads (then `images` and `projected` are 0)
    patch_sq: int = 0  # variable grids: sum over images of (h*w)^2
    n_images: int | None = None  # images in the batch (anyres: not crops); None = `projected`
    grid_images: int = 0  # variable grids: images (each adds the tower's CLS row, if any)

    @property
    def image_count(self) -> int:
        """Images in the batch as a user counts them (throughput's images_per_s)."""
        return self.projected if self.n_images is None else self.n_images

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def batch_stats(batch: dict) -> BatchStats:
    """Counts of one model input dict (`input_ids`, `attention_mask`, `labels`, `pixel_values`, ...)."""
    ids = batch["input_ids"]  # [B, T]
    if batch.get("cu_seqlens") is not None:
        cu = batch["cu_seqlens"].flatten().tolist()
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    elif batch.get("attention_mask") is not None and batch["attention_mask"].dim() == 2:
        lengths = batch["attention_mask"].sum(-1).tolist()
    else:
        lengths = [ids.shape[-1]] * ids.shape[0]
    labels = batch.get("labels")
    targets = 0 if labels is None else int(count_targets(labels, batch.get("cu_seqlens")))
    pix = batch.get("pixel_values")
    grid = batch.get("image_grid")  # [n_images, 2] patch grids: pixel rows are patches
    if grid is not None and pix is not None:
        n = (grid[:, 0] * grid[:, 1]).tolist()
        return BatchStats(samples=len(lengths), lengths=[int(x) for x in lengths], targets=targets, images=0,
                          projected=0, patches=int(sum(n)), patch_sq=int(sum(x * x for x in n)),
                          n_images=len(n), grid_images=len(n))
    images = 0 if pix is None else int(pix.shape[0])  # the tower runs on these
    feats = batch.get("image_features")  # cached tower output [n_images, T, C]: the tower is skipped
    projected = images + (0 if feats is None else int(feats.shape[0]))
    crops = batch.get("image_crops")  # anyres [n_images]: pixel rows are crops
    return BatchStats(samples=len(lengths), lengths=[int(n) for n in lengths], targets=targets,
                      images=images, projected=projected, n_images=None if crops is None else len(crops))


def step_flops(dims: ModelDims, stats: BatchStats) -> dict[str, int]:
    """FLOPs of one micro-batch by part (see the module docstring); "total" is their sum."""
    n, p, sq = stats.grid_images, stats.patches, stats.patch_sq  # sum((hw + c)^2) = sq + 2c·p + c²·n
    grid = sum(mult * (p + c * n) + att * (sq + 2 * c * p + c * c * n) for mult, att, c in dims.grid_towers)
    if not dims.grid_towers:  # dims built by hand: patch rows only
        grid = dims.tower_per_patch * p + dims.tower_attention * sq
    out = {
        "towers": dims.tower_per_image * stats.images + grid,
        "projector": dims.projector_per_image * stats.projected
        + dims.projector_per_row * (stats.patches // dims.merge**2),
        "lm": dims.lm_per_token * stats.tokens,
        "attention": dims.lm_attention * sum(n * n for n in stats.lengths),
        "head": dims.head_per_target * stats.targets,
    }
    out["total"] = sum(out.values())
    return out
