"""Memory and compute of a training run before it starts, from the config files alone (no weights).

    python -m qwenvl_lab.model.plan configs/qwen7b_siglip_lora.yaml [key=value ...] --gpus 8 --gpu-mem 80

Contract:
- `meta_model(cfg, device="cuda") -> (VLM on the meta device, base dtype name)`: the run's VLM built from
  config files only — a local directory's / file's `config.json`, else a fixture in `configs/hub/`
  (`<owner>--<name>.json`: the published config of each hub model the presets name), else the hub's
  config.json — with the stage's trainable set (LoRA, freeze regexes) applied and trainable parameters in
  fp32. `dtype: auto` is bf16 for a GPU plan (a GPU with native bf16: Ampere or later) and this CPU's
  decision for `device="cpu"`.
- `make_plan(cfg, gpus, gpu_mem_gib, ..., device="cuda") -> Plan`: parameters per part (total /
  trainable); per-GPU bytes of weights, gradients and optimizer states for DDP, ZeRO-2, ZeRO-3 and FSDP;
  activation memory per sample with and without gradient checkpointing; FLOPs per sample; an estimated
  step time at a stated MFU; whether each engine fits, and the fewest GPUs of that memory it needs.
  `format_plan(plan) -> str` prints it. `dtype` (here and in `meta_model`) replaces the config's model dtype.
- `predict_on_device(cfg, device, dtype, seq, images, targets, micro_batch, mfu=None) -> DevicePrediction`:
  what one training step on one device (DDP, 1 process) needs — `memory_bytes` (model states + one
  micro-batch's activations) and `step_seconds` — the figures `benchmarks/smoke_real.py` prints beside its
  measurements on a CPU or a GPU. Without `mfu` the MFU is measured: `measure_block(cfg, device, seq,
  dtype) -> BlockTiming` builds one LM block of the run (a Qwen LM: its LoRA, dtype, bf16 autocast,
  checkpointing) with random weights and times its forward, recompute and backward at `seq` tokens;
  MFU = the plan's FLOPs of that block / its mean time / `model.flops.peak_matmul_flops` in the
  dtype. A constant does not carry across machines: the real-shape step reached 0.59-0.77 of the matmul
  peak in fp32 on an AVX2 CPU but 0.32 in bf16 on an AMX one, where the matmuls got faster and the
  elementwise work and the small LoRA matmuls did not (docs/scale.md).
- Model states (P = all parameters, Pt = trainable, c = 2 bytes under bf16 autocast, else 4):
  DDP: weights in their own dtypes, fp32 gradients (plus DDP's bucket copy with >1 GPU), AdamW 8·Pt,
  and under bf16 autocast 2·Pt of bf16 copies of the fp32 trainables (autocast's cast cache; `casts`);
  ZeRO-2: c·P weights + (2+4)·Pt/N gradients (16-bit and fp32 partitions) + 12·Pt/N (fp32 master and
  moments) = DeepSpeed's `2P + 18P/N` when everything trains; ZeRO-3: c·P/N + 4·(largest module) + 4·Pt/N
  + 12·Pt/N = DeepSpeed's `4L + 18P/N`; FSDP (FULL_SHARD, QWenBlock units): weights, fp32 gradients and
  AdamW states sharded 1/N, plus the gathered root unit (towers, projector, embeddings, head) and two
  gathered blocks (current + prefetched) in c bytes.
- Activations per sample of `seq` tokens (`image_tokens` of them from images), per LM layer and token,
  c bytes each (the tensors autograd saves in qwen/modeling.py; tests/test_plan.py checks the count to 20%):
  base weights train: 3H (norm outputs, residual) + (q + 2kv) (fused qkv) + q + kv (rotated q, k) + 2q
  (attention output, c_proj input) + 4I (the two MLP branches, silu, product) + heads (logsumexp);
  frozen base: 2H (residuals) + 4q (rotated q, k and v expanded to the query heads, output) + 3I +
  heads + per LoRA-wrapped linear its input twice (dropout mask and output) and its rank; plus 8H bytes
  of fp32 norm inputs under bf16. With gradient checkpointing only each layer's input (c·H) stays, plus
  one layer recomputed. The loss head keeps the supervised rows' hidden states and, transiently, one
  chunk of logits (min(targets, the VLM's loss_chunk_size) x V: one fp32 buffer, plus the head's
  c-byte output when c is not 4; core/loss.py `_head_chunk`). Memory-efficient attention
  (SDPA flash / the custom kernels) keeps no T² scores. Frozen towers run under no_grad (no activations);
  a training tower holds c·(10 D + 2 I_v) per token and layer (the worst image's patches, or crops x
  patches, plus a CLS row per crop) and the c·3·p² input pixels of each patch (tests/test_variable_training.py
  checks an image of the worst-case size to 20%).
- FLOPs: `model.flops` counting (6·N·tokens for what trains, 4·N where only the gradient passes,
  2·N frozen forward; attention 4·L·d·s² forward), plus the recomputed LM forward under gradient
  checkpointing. Step time = FLOPs per GPU per optimizer step / (GPU peak x MFU); communication is not
  modelled.
- A GPU fits a run when 1.1 x (model states + micro-batch activations) + 1.5 GiB (CUDA context,
  workspaces) <= its memory.
Bad input (unknown keys, a model without a config anywhere) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.cli import run_cli
from ..core.config_io import load_config
from ..core.errors import UserError
from ..kernels.prepare import prepare_attention
from ..qwen import QWenConfig
from ..qwen.modeling import rope_cos_sin
from ..visual.resolution import Resolution, sweep_sizes
from .checkpoint import read_vlm_config
from .config import VLMConfig
from .dtypes import auto_decision
from .flops import (
    BatchStats,
    ModelDims,
    _config,
    _tower_list,
    _vit_attention,
    peak_matmul_flops,
    step_flops,
)
from .model import build_vlm
from .paths import is_qwenvl_chat_dir, resolve_model_dir
from .plan_released import PlanView, count_released, llava_vlm_config, meta_released, released_config
from .qwenvl_chat import qwenvl_chat_config
from .stages import apply_stage
from .train_config import TrainConfig

HUB_DIR = Path(__file__).resolve().parents[1] / "configs" / "hub"
ENGINES = ("DDP", "ZeRO-2", "ZeRO-3", "FSDP")
GIB = 2**30
CONTEXT_BYTES = int(1.5 * GIB)  # CUDA context, cuBLAS / NCCL workspaces
FRAGMENTATION = 1.1  # caching allocator slack over what is live


class PlanError(UserError, ValueError):
    """A config the plan cannot build (named file or key, and what to do)."""


# ----- building on the meta device ------------------------------------------------------------------
def config_file(name_or_path: str, what: str) -> Path:
    """The config.json of a local dir / file, else the shipped fixture, else the hub's (when reachable)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if (p / "config.json").is_file():
        return p / "config.json"
    fixture = HUB_DIR / (str(name_or_path).replace("/", "--") + ".json")
    if fixture.is_file():
        return fixture
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            return Path(hf_hub_download(str(name_or_path), "config.json"))
        except Exception:  # noqa: BLE001 - any hub failure ends in the one message below
            pass
    raise PlanError(f"{what} {name_or_path!r}: no local config.json, no fixture {fixture.relative_to(HUB_DIR.parents[1])} "
                    f"and the hub is unreachable; point {what} at a directory holding its config.json")


def _meta_vlm_config(vcfg: VLMConfig, base_dtype: str) -> VLMConfig:
    """The same model with every part built from its config alone (random weights, no download)."""
    d = vcfg.to_dict()
    if vcfg.init_from is not None:
        raise PlanError(f"model.init_from={vcfg.init_from!r} (an imported Llava) cannot be planned; plan the "
                        f"preset it came from instead")
    if not vcfg.is_scratch_lm:
        raw = json.loads(config_file(vcfg.lm, "model.lm").read_text())
        if vcfg.lm_backend == "qwen":
            d["lm_config"] = QWenConfig.from_native_dict(raw, source=str(vcfg.lm)).to_dict()
        else:
            d["lm_config"] = raw
        d["lm"] = "scratch"
    d["tokenizer"] = None
    if d.get("image_token_id") is None:
        d["image_token_id"] = 0  # no tokenizer on the meta device; the id does not change any count
    towers = []
    for spec in vcfg.towers:
        spec = dict(spec)
        if spec["backend"].startswith("hf_"):
            spec["name_or_path"] = str(config_file(spec["name_or_path"], f"tower {spec['name_or_path']}"))
        spec["pretrained"] = False
        towers.append(spec)
    d["towers"] = towers
    d["dtype"] = base_dtype
    if d.get("tower_dtype") == "auto":
        d["tower_dtype"] = base_dtype if base_dtype != "float16" else "float32"
    return VLMConfig.from_dict(d)


def base_dtype_for(name: str, device: str) -> str:
    """`dtype: auto` on the planned device: a GPU plan assumes native bf16 (Ampere or later)."""
    if name != "auto":
        return name
    if device == "cuda":
        return "bfloat16"
    return auto_decision("cpu").name


@contextlib.contextmanager
def _quiet():
    """The stage's per-module report is for training runs, not for a plan."""
    quiet = [logging.getLogger(n) for n in ("qwenvl_lab", "peft", "transformers")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)


def meta_model(cfg, device: str = "cuda", dtype: str | None = None) -> tuple[nn.Module, str]:
    """The run's VLM on the meta device with the stage applied (see the module docstring); `dtype` (a
    `VLMConfig.dtype` name) replaces the config's."""
    with tempfile.TemporaryDirectory(prefix="plan_") as tmp, _quiet():
        vcfg = _vlm_config(cfg, Path(tmp))
        base = base_dtype_for(dtype or vcfg.dtype, device)
        with torch.device("meta"):
            try:
                vlm = build_vlm(_meta_vlm_config(vcfg, base))
            except ValueError as e:  # the parts do not fit together (e.g. a grid the reduction cannot split)
                raise PlanError(f"model: {e}") from None
            lora = copy.copy(cfg.lora)
            lora.qlora = False  # 4-bit bases are not modelled; the plan counts bf16 bases
            apply_stage(vlm, cfg, lora)  # the run's own sequence (trainer/run.py build_model)
    return vlm, base


def _released(cfg):
    """(family, config.json dict) when the run starts from a released checkpoint (model/plan_released.py)."""
    if cfg.vlm_config() is not None or cfg.init_from is None:
        return None
    return released_config(str(cfg.init_from), config_file)


def _vlm_config(cfg, tmp: Path) -> VLMConfig:
    """The run's VLMConfig: the recipe's model, or what `init_from` holds (ours, or a released native family's
    import, mapped from its config.json into `tmp`)."""
    vcfg = cfg.vlm_config()
    if vcfg is not None:
        return vcfg
    if is_qwenvl_chat_dir(cfg.init_from):  # a released Qwen-VL(-Chat) directory: no vlm_config.json
        return qwenvl_chat_config(cfg.init_from)
    released = _released(cfg)
    if released is not None and released[0].native:
        try:
            return llava_vlm_config(released[1], str(cfg.init_from), tmp)
        except (KeyError, ValueError) as e:
            raise PlanError(f"init_from={cfg.init_from!r}: its config.json cannot be planned ({e})") from None
    try:
        return read_vlm_config(resolve_model_dir(cfg.init_from))[0]
    except (FileNotFoundError, ValueError, OSError, UserError):
        raise PlanError(f"init_from={cfg.init_from!r} does not exist yet; name the model it will hold, e.g. "
                        f"preset=qwen1.8b-clip336") from None


# ----- counting ---------------------------------------------------------------------------------------
@dataclass
class PartCount:
    total: int = 0
    trainable: int = 0
    bytes: int = 0


def count_parts(vlm: nn.Module) -> dict[str, PartCount]:
    """Parameters per part (towers, projector, lm, lora; tied tensors once) and their bytes in their dtypes."""
    out: dict[str, PartCount] = {}
    seen: set[int] = set()
    for name, p in vlm.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = "lora" if "lora_" in name else name.split(".")[0]  # adapters apart: the base LM keeps its count
        c = out.setdefault(part, PartCount())
        c.total += p.numel()
        c.trainable += p.numel() if p.requires_grad else 0
        c.bytes += p.numel() * p.element_size()
    return out


def _largest_module_params(vlm: nn.Module) -> int:
    """DeepSpeed's `largest_layer_params`: the most parameters any one module holds directly."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in vlm.modules()), default=0)


def _block_units(vlm: nn.Module) -> tuple[int, int]:
    """(params of the largest transformer block, params outside every block) for FSDP's wrap units."""
    blocks = [m for m in vlm.modules() if type(m).__name__ in ("QWenBlock",) or type(m).__name__.endswith("DecoderLayer")]
    inside = {id(p) for b in blocks for p in b.parameters()}
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    root = sum(p.numel() for p in vlm.parameters() if id(p) not in inside)
    return largest, root


@dataclass
class LMDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int  # one MLP branch
    vocab: int
    lora_per_layer: int  # elements per token saved by LoRA-wrapped linears of one layer
    base_trains: bool  # the LM's own linear weights take gradients (stage full)


def lm_dims(vlm: nn.Module) -> LMDims:

    cfg = _config(vlm.lm)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    layers = int(cfg.num_hidden_layers)
    lora = 0
    for _, m in vlm.lm.named_modules():
        a = getattr(m, "lora_A", None)
        if isinstance(a, nn.ModuleDict) and len(a):
            key = next(iter(a.keys()))
            drop = m.lora_dropout[key]
            # dropout keeps its mask and output (input-sized each); without it the input itself is kept
            lora += a[key].in_features * (1 if isinstance(drop, nn.Identity) else 2) + a[key].out_features
    vocab = int(vlm.lm.get_output_embeddings().weight.shape[0])
    base_trains = any(p.requires_grad for n, p in vlm.lm.named_parameters()
                      if "lora_" not in n and n.endswith("weight") and p.ndim == 2)
    return LMDims(layers, int(cfg.hidden_size), heads, kv, head_dim, int(cfg.intermediate_size), vocab,
                  lora // max(layers, 1), base_trains)


# ----- the estimates ----------------------------------------------------------------------------------
@dataclass
class Shape:
    seq: int  # tokens per sample, image tokens included
    image_tokens: int
    images: int
    targets: int  # supervised tokens per sample
    micro_batch: int
    accumulation: int
    tower_tokens: int | None = None  # tokens the towers read per sample (None: images x one square crop)
    tower_inputs: int | None = None  # sequences the towers run per sample (crops or images; None: images)


@dataclass
class ImagePlan:
    """Tokens per image under the model's resolution settings (visual/resolution.py), for the plan's worst case."""

    mode: str
    per_image: tuple[int, int, int]  # LM tokens per image: min, typical (median of the sweep), max (formula)
    worst: int  # LM tokens per image in a sample of `images` images (the multi-image policy applied)
    tower_tokens: int  # tokens the towers read for the worst image (crops x tokens per crop, or patches)
    crops: int  # tower inputs for the worst image (anyres: base + tiles; 1 otherwise)


def image_plan(vlm: nn.Module, images: int) -> ImagePlan:
    """The image side of the plan from `vlm.resolution` (fixed: every image one square crop)."""
    res = getattr(vlm, "resolution", None) or Resolution(
        mode="fixed", image_size=int(vlm.towers.image_size), grid=tuple(vlm.towers.grid),
        tokens_per_crop=int(vlm.tokens_per_image))
    counts = sorted(res.tokens(w, h) for w, h in sweep_sizes(res))
    worst = res.max_tokens(images)
    per_crop = int(vlm.towers.num_tokens)
    if res.mode in ("fixed", "anyres"):
        single = images > 1 and res.multi_image == "base"
        crops = 1 if res.mode == "fixed" or single else max(res.layout(pw, ph).crops for ph, pw in res.pinpoints)
        tower = crops * per_crop
    else:
        crops, tower = 1, worst * (res.merge**2 if res.mode == "native" else 1)
    return ImagePlan(res.mode, (counts[0], counts[len(counts) // 2], res.max_tokens()), worst, tower, crops)


def activation_bytes(vlm: nn.Module, shape: Shape, c: int, checkpointing: bool, samples: int = 1) -> dict[str, int]:
    """Activation memory of `samples` samples of `shape` (see the module docstring), by part. The loss
    head's chunk of logits is shared by the micro-batch's supervised rows."""
    d = lm_dims(vlm)
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    if d.base_trains:  # the base weights' gradients need every linear's input
        per_token = c * (3 * d.hidden + (q + 2 * kv) + q + kv + 2 * q + 4 * d.inter + d.heads)
    else:  # frozen base: residuals, attention (k, v expanded to the query heads), MLP branches, LoRA inputs
        per_token = c * (2 * d.hidden + 4 * q + 3 * d.inter + d.heads + d.lora_per_layer)
    per_token += 8 * d.hidden if c == 2 else 0  # RMSNorm's fp32 copies of its input under bf16
    s = shape.seq
    layer = per_token * s
    lm = d.layers * c * d.hidden * s + layer if checkpointing else d.layers * layer
    logit_bytes = 4 if c == 4 else c + 4  # the chunk's fp32 buffer (+ the head's own output under bf16/fp16)
    head = min(shape.targets * samples, vlm.loss_chunk_size) * d.vocab * logit_bytes + shape.targets * samples * d.hidden * c
    proj_in = int(vlm.projector.in_dim)
    projector = shape.image_tokens * c * (proj_in + 2 * int(vlm.projector.out_dim))
    towers = 0
    if any(p.requires_grad for p in vlm.towers.parameters()):
        for t in _tower_list(vlm.towers):
            n_layers, width = _vit_attention(t)
            cls, patches = int(bool(getattr(t, "has_cls", False))), int(t.grid[0] * t.grid[1])
            read = shape.tower_tokens if shape.tower_tokens is not None else shape.images * patches
            runs = shape.tower_inputs if shape.tower_inputs is not None else shape.images
            inter = int(getattr(getattr(getattr(t, "model", t), "config", None), "intermediate_size", 4 * width))
            towers += (read + cls * runs) * n_layers * c * (10 * width + 2 * inter)  # + a CLS row per run
            towers += read * c * 3 * int(t.image_size) ** 2 // patches  # the pixels the patch embedding saves
    out = {"lm": lm * samples, "head": head, "projector": projector * samples, "towers": towers * samples}
    out["total"] = sum(out.values())
    return out


def model_states(counts: dict[str, PartCount], engine: str, n: int, c: int, largest: int,
                 units: tuple[int, int]) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients and optimizer states (see the module docstring); `casts`: the
    bf16 copies autocast makes of the fp32 trainable weights (DDP under bf16 autocast)."""
    p_all = sum(x.total for x in counts.values())
    p_t = sum(x.trainable for x in counts.values())
    w_own = sum(x.bytes for x in counts.values())
    casts = 0
    if engine == "DDP":
        w, g, o = w_own, 4 * p_t * (2 if n > 1 else 1), 8 * p_t
        # autocast caches a bf16 copy of each fp32 leaf weight it casts until the forward's autocast exits
        # (torch.is_autocast_cache_enabled); backward keeps those it saved. Measured: +2 bytes per trainable.
        casts = 2 * p_t if c == 2 else 0
    elif engine == "ZeRO-2":
        w = c * p_all
        g = ((2 + 4) if c == 2 else 4) * p_t // n
        o = (12 if c == 2 else 8) * p_t // n
    elif engine == "ZeRO-3":
        w = c * p_all // n + (4 if c == 2 else 8) * largest
        g = 4 * p_t // n
        o = (12 if c == 2 else 8) * p_t // n
    elif engine == "FSDP":
        block, root = units
        w = w_own // n + c * (root + 2 * block)
        g, o = 4 * p_t // n, 8 * p_t // n
    else:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    return {"weights": w, "casts": casts, "grads": g, "optimizer": o, "total": w + casts + g + o}


def flops_per_sample(vlm: nn.Module, shape: Shape, checkpointing: bool, ip: ImagePlan | None = None) -> dict[str, int]:
    """FLOPs of one sample of `shape`; `ip` (the worst image) counts crops (anyres) or patches (native)."""
    dims = ModelDims.from_model(vlm)
    crops = shape.images * (ip.crops if ip is not None else 1)
    stats = BatchStats(samples=1, lengths=[shape.seq], targets=shape.targets, images=crops, projected=crops)
    if ip is not None and ip.mode in ("native", "naflex"):  # every image the worst patch grid
        per = ip.tower_tokens
        stats = BatchStats(samples=1, lengths=[shape.seq], targets=shape.targets, images=0, projected=0,
                           patches=per * shape.images, patch_sq=per * per * shape.images,
                           n_images=shape.images, grid_images=shape.images)
    out = step_flops(dims, stats)
    recompute = 0
    if checkpointing:
        p = dims.parts
        recompute = 2 * p["lm_body_params"] * shape.seq + 4 * p["lm_layers"] * p["lm_attn_width"] * shape.seq ** 2
    out["recompute"] = recompute
    out["total"] += recompute
    return out


def fits(total_bytes: int, gpu_mem_gib: float) -> bool:
    return FRAGMENTATION * total_bytes + CONTEXT_BYTES <= gpu_mem_gib * GIB


@dataclass
class Plan:
    source: str
    stage: str
    base_dtype: str
    compute_bytes: int
    gpus: int
    gpu_mem_gib: float
    gpu_tflops: float
    mfu: float
    checkpointing: bool
    shape: Shape
    counts: dict[str, PartCount]
    largest_module: int
    engines: dict[str, dict[str, int]]
    activations: dict[str, dict[str, int]]  # "checkpointing" / "no checkpointing": one sample; "micro-batch"
    flops: dict[str, int]
    min_gpus: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    image: ImagePlan | None = None

    @property
    def trainable(self) -> int:
        return sum(c.trainable for c in self.counts.values())

    @property
    def total_params(self) -> int:
        return sum(c.total for c in self.counts.values())

    def activation_per_gpu(self) -> int:
        """Activations of one micro-batch with the recipe's checkpointing setting."""
        return self.activations["micro-batch"]["total"]

    def step_seconds(self) -> float:
        """Estimated seconds per optimizer step (each GPU runs micro_batch x accumulation samples)."""
        per_gpu = self.flops["total"] * self.shape.micro_batch * self.shape.accumulation
        return per_gpu / (self.gpu_tflops * 1e12 * self.mfu)


def make_plan(cfg, gpus: int, gpu_mem_gib: float, gpu_tflops: float = 989.0, mfu: float = 0.4,
              device: str = "cuda", seq: int | None = None, images: int = 1, targets: int | None = None,
              micro_batch: int | None = None, source: str = "", dtype: str | None = None) -> Plan:
    """The plan of `cfg` (a TrainConfig) on `gpus` GPUs of `gpu_mem_gib` each (see the module docstring);
    `dtype` replaces the config's model dtype."""
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    released = _released(cfg)
    if released is not None and not released[0].native:  # a wrapper family: transformers' model itself
        return _wrapper_plan(cfg, released, gpus, gpu_mem_gib, device, seq, images, micro_batch, source, dtype)
    vlm, base = meta_model(cfg, device, dtype)
    c = 2 if base in ("bfloat16", "float16") else 4
    ip = image_plan(vlm, images)
    image_tokens = ip.worst * images  # the worst case: every image at the most tokens its settings allow
    seq = int(seq or cfg.max_length)
    if image_tokens >= seq:
        raise PlanError(f"{images} image(s) x {ip.worst} tokens (the most an image can get) do not fit "
                        f"max_length={seq}; raise max_length or lower the resolution settings")
    text = seq - image_tokens
    shape = Shape(seq=seq, image_tokens=image_tokens, images=images,
                  targets=int(targets if targets is not None else (text if cfg.data_mode == "plain" else text // 2)),
                  micro_batch=int(micro_batch or cfg.per_device_train_batch_size),
                  accumulation=max(1, cfg.accumulation_steps(gpus) if cfg.global_batch_size
                                   else cfg.gradient_accumulation_steps),
                  tower_tokens=ip.tower_tokens * images, tower_inputs=ip.crops * images)
    counts = count_parts(vlm)
    largest, units = _largest_module_params(vlm), _block_units(vlm)
    engines = {e: model_states(counts, e, gpus, c, largest, units) for e in ENGINES}
    ckpt = bool(cfg.gradient_checkpointing)
    acts = {"checkpointing": activation_bytes(vlm, shape, c, True),
            "no checkpointing": activation_bytes(vlm, shape, c, False),
            "micro-batch": activation_bytes(vlm, shape, c, ckpt, samples=shape.micro_batch)}
    plan = Plan(source=source, stage=cfg.stage, base_dtype=base, compute_bytes=c, gpus=gpus,
                gpu_mem_gib=gpu_mem_gib, gpu_tflops=gpu_tflops, mfu=mfu,
                checkpointing=ckpt, shape=shape, counts=counts,
                largest_module=largest, engines=engines, activations=acts,
                flops=flops_per_sample(vlm, shape, ckpt, ip), image=ip)
    act = plan.activation_per_gpu()
    for e in ENGINES:
        plan.min_gpus[e] = next((n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                                 if fits(model_states(counts, e, n, c, largest, units)["total"] + act, gpu_mem_gib)),
                                None)
    if cfg.lora.qlora:
        plan.notes.append("lora.qlora=true: the 4-bit base is not modelled (bases counted in bf16)")
    return plan


def _wrapper_plan(cfg, released, gpus: int, gpu_mem_gib: float, device: str, seq: int | None, images: int,
                  micro_batch: int | None, source: str, dtype: str | None) -> Plan:
    """The plan of a run of a released wrapper family (model/plan_released.py): parameters and trainables of
    the wrapper on the meta device, model states per engine, LM activations; no FLOPs."""
    base = base_dtype_for(dtype or "auto", device)
    with _quiet():
        vlm = meta_released(released[0], released[1], cfg, base)
    c = 2 if base in ("bfloat16", "float16") else 4
    seq = int(seq or cfg.max_length)
    shape = Shape(seq=seq, image_tokens=seq // 2, images=images, targets=seq // 4,
                  micro_batch=int(micro_batch or cfg.per_device_train_batch_size),
                  accumulation=max(1, cfg.accumulation_steps(gpus) if cfg.global_batch_size
                                   else cfg.gradient_accumulation_steps))
    counts = count_released(vlm, PartCount)
    largest, units = _largest_module_params(vlm), _block_units(vlm)
    engines = {e: model_states(counts, e, gpus, c, largest, units) for e in ENGINES}
    view = PlanView(vlm, seq)
    logits = dataclasses.replace(shape, targets=seq)  # the wrapper's loss reads every position's logits
    ckpt = bool(cfg.gradient_checkpointing)
    acts = {"checkpointing": activation_bytes(view, logits, c, True),
            "no checkpointing": activation_bytes(view, logits, c, False),
            "micro-batch": activation_bytes(view, logits, c, ckpt, samples=shape.micro_batch)}
    plan = Plan(source=source, stage=cfg.stage, base_dtype=base, compute_bytes=c, gpus=gpus, gpu_mem_gib=gpu_mem_gib,
                gpu_tflops=0.0, mfu=0.0, checkpointing=ckpt, shape=shape, counts=counts, largest_module=largest,
                engines=engines, activations=acts, flops={})
    act = plan.activation_per_gpu()
    for e in ENGINES:
        plan.min_gpus[e] = next((n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                                 if fits(model_states(counts, e, n, c, largest, units)["total"] + act, gpu_mem_gib)),
                                None)
    plan.notes.append(f"{released[0].name} runs through transformers' own model (model/released.py): image tokens "
                      f"are assumed half of each sample ({shape.image_tokens}); compute and step time are not "
                      f"estimated for it")
    if view.vision_trains:
        plan.notes.append("vision_lr > 0: the training vision tower's activations are not counted")
    return plan


# ----- one device, measured: what smoke_real and the GPU check compare ---------------------------------
@dataclass
class BlockTiming:
    """One LM block's training work (forward, the recompute under checkpointing, backward) timed on a device."""

    seconds: float  # mean wall time of the repeats (a single step is compared with it: not the luckiest run)
    cpu_seconds: float  # their mean process CPU time (CPU devices: tells a loaded machine from a slow one)
    flops: int  # the plan's count for that work (the LM's share per layer)
    peak_flops: float  # the device's measured square-matmul peak in the run's dtype (model.flops)

    @property
    def mfu(self) -> float:
        return self.flops / self.seconds / self.peak_flops


def _lm_block(vlm: nn.Module) -> nn.Module:
    blocks = [m for m in vlm.lm.modules() if type(m).__name__ == "QWenBlock"]
    if not blocks:
        raise PlanError(f"measuring the MFU needs a Qwen LM (model.lm_backend=qwen), this one is "
                        f"{type(vlm.lm).__name__}; give the MFU instead (--mfu)")
    return blocks[0]


def _materialise(block: nn.Module, device: torch.device) -> nn.Module:
    """The meta block with random weights on `device` in its own dtypes (garbage would time denormals)."""
    block = block.to_empty(device=device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0)
    return block


def measure_block(cfg, device: str | torch.device = "cpu", seq: int | None = None, dtype: str | None = None,
                  repeats: int = 2, micro_batch: int = 1) -> BlockTiming:
    """Time one LM block of the run (its LoRA / trainable set, dtype and bf16 autocast, checkpointing,
    `micro_batch` x `seq` tokens; a Qwen LM) on `device` after one warm-up: the MFU this machine reaches on
    the model's own layer, elementwise work and small LoRA matmuls included, which the step time assumes."""

    dev = torch.device(device)
    seq = int(seq or cfg.max_length)
    with contextlib.redirect_stdout(io.StringIO()):
        vlm, base = meta_model(cfg, dev.type, dtype)
    ckpt = bool(cfg.gradient_checkpointing)
    f = flops_per_sample(vlm, Shape(seq, 0, 0, 0, 1, 1), ckpt)
    grad_flows = ModelDims.from_model(vlm).parts["grad_through_lm"]
    block, lcfg = _materialise(_lm_block(vlm), dev), _config(vlm.lm)
    block.train()
    del vlm
    bdt = getattr(torch, base)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(micro_batch, seq, int(lcfg.hidden_size), generator=g) * 0.5).to(dev, bdt)  # [B, T, H]
    x.requires_grad_(grad_flows)  # the gradient passes through the LM when anything before it trains
    positions = torch.arange(seq, device=dev)[None].expand(micro_batch, seq)  # [B, T]
    cos, sin = rope_cos_sin(positions, int(lcfg.head_dim), float(lcfg.rope_theta), None)
    compute = torch.bfloat16 if bdt == torch.bfloat16 else bdt
    prepare_attention(dev, compute, int(lcfg.head_dim), getattr(lcfg, "attn_impl", "auto"))  # as the run does
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    walls, cpus = [], []
    for i in range(repeats + 1):  # the first run is a warm-up (kernel selection, thread pools)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bdt == torch.bfloat16):
            args = (x, cos, sin, None, None, None, None)
            y = checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)  # [B, T, H]
        y.float().square().mean().backward()
        sync()
        t, c = time.perf_counter() - t0, time.process_time() - c0
        if i:
            walls.append(t)
            cpus.append(c)
    per_layer = micro_batch * (f["lm"] + f["attention"] + f["recompute"]) // int(lcfg.num_hidden_layers)
    return BlockTiming(sum(walls) / len(walls), sum(cpus) / len(cpus), per_layer, peak_matmul_flops(dev, bdt))


def mean_timing(timings: list[BlockTiming]) -> BlockTiming:
    """Several measurements of the same block (e.g. before and after a step, to bracket its load) as one."""
    n = len(timings)
    return BlockTiming(sum(t.seconds for t in timings) / n, sum(t.cpu_seconds for t in timings) / n,
                       timings[0].flops, max(t.peak_flops for t in timings))


@dataclass
class DevicePrediction:
    """The plan of one training step on one device (DDP with 1 process), as smoke_real compares it."""

    plan: Plan
    memory_bytes: int  # weights + autocast copies + gradients + AdamW states + one micro-batch's activations
    step_seconds: float  # FLOPs of the micro-batch / (peak_flops x mfu)
    peak_flops: float
    mfu: float
    mfu_source: str


def predict_on_device(cfg, device: str = "cpu", dtype: str | None = None, seq: int | None = None, images: int = 1,
                      targets: int | None = None, micro_batch: int | None = None, mfu: float | None = None,
                      timing: BlockTiming | None = None) -> DevicePrediction:
    """Peak memory and step time of `cfg` on one `device` ("cpu" / "cuda") in `dtype` (None: the config's).
    The MFU is `mfu` when given, else measured on that device (`timing`, or `measure_block` now)."""

    dev = torch.device(device)
    with contextlib.redirect_stdout(io.StringIO()):
        plan = make_plan(cfg, gpus=1, gpu_mem_gib=1e6, device=dev.type, seq=seq, images=images, targets=targets,
                         micro_batch=micro_batch, dtype=dtype)
    if mfu is not None:
        peak, source = peak_matmul_flops(dev, getattr(torch, plan.base_dtype)), "given"
    else:
        timing = timing or measure_block(cfg, dev, plan.shape.seq, dtype, micro_batch=plan.shape.micro_batch)
        mfu, peak = timing.mfu, timing.peak_flops
        source = f"measured on one LM block ({timing.seconds:.2f} s for {timing.flops / 1e12:.3f} TFLOP)"
    memory = plan.engines["DDP"]["total"] + plan.activation_per_gpu()
    step = plan.flops["total"] * plan.shape.micro_batch / (peak * mfu)
    return DevicePrediction(plan, memory, step, peak, mfu, source)


# ----- printing ---------------------------------------------------------------------------------------
def _g(b: float) -> str:
    return f"{b / GIB:8.2f}"


def format_plan(plan: Plan) -> str:
    s, L = plan.shape, []
    L.append(f"plan: {plan.source} (stage {plan.stage}), {plan.gpus} GPU(s) x {plan.gpu_mem_gib:g} GiB")
    L.append(f"  base weights {plan.base_dtype}, trainable fp32 + AdamW (fp32 moments), "
             f"{'bf16 autocast' if plan.compute_bytes == 2 else 'fp32 compute'}; one sample = {s.seq} tokens "
             f"({s.image_tokens} image tokens from {s.images} image(s), {s.targets} supervised); micro-batch "
             f"{s.micro_batch}, accumulation {s.accumulation}; gradient checkpointing "
             f"{'on' if plan.checkpointing else 'off'}")
    if plan.image is not None:
        ip = plan.image
        L.append(f"  images: {ip.mode} resolution; LM tokens per image min / typical / max = "
                 f"{ip.per_image[0]} / {ip.per_image[1]} / {ip.per_image[2]}; planned for the worst case: "
                 f"{s.images} x {ip.worst} tokens, the towers reading {ip.tower_tokens} tokens"
                 f"{f' in {ip.crops} crops' if ip.crops > 1 else ''} per image")
    L.append("")
    L.append(f"{'parameters':<12}{'total':>16}{'trainable':>16}{'bytes (GiB)':>13}")
    for name, c in plan.counts.items():
        L.append(f"  {name:<10}{c.total:>16,}{c.trainable:>16,}{_g(c.bytes):>13}")
    tb = sum(c.bytes for c in plan.counts.values())
    L.append(f"  {'total':<10}{plan.total_params:>16,}{plan.trainable:>16,}{_g(tb):>13}")
    L.append("")
    act = plan.activation_per_gpu()
    L.append(f"per-GPU memory (GiB) with {plan.gpus} GPU(s); activations = {s.micro_batch} sample(s), checkpointing "
             f"{'on' if plan.checkpointing else 'off'}")
    L.append(f"  {'engine':<8}{'weights':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'total':>9}  fits {plan.gpu_mem_gib:g} GiB"
             f"   fewest GPUs")
    for e, m in plan.engines.items():
        total = m["total"] + act
        ok = "yes" if fits(total, plan.gpu_mem_gib) else "NO"
        need = plan.min_gpus[e]
        if need:
            need_s = str(need)
        elif not fits(act, plan.gpu_mem_gib):
            need_s = "none: the activations alone overflow (smaller micro-batch, checkpointing or --seq)"
        else:
            need_s = "> 256"
        L.append(f"  {e:<8}{_g(m['weights'] + m['casts'])}{_g(m['grads'])}{_g(m['optimizer'])}{_g(act)}{_g(total)}  {ok:<4}"
                 f"{'':>9}{need_s}")
    L.append(f"  (fits = 1.1 x total + {CONTEXT_BYTES / GIB:g} GiB CUDA context/workspaces <= GPU memory; "
             f"ZeRO-3 holds the largest module, {plan.largest_module:,} params, gathered"
             + ("; DDP's weights include autocast's bf16 copies of the trainables)" if plan.compute_bytes == 2 else ")"))
    L.append("")
    L.append("activation memory per sample (GiB)")
    for k, a in plan.activations.items():
        if k == "micro-batch":
            continue
        L.append(f"  {k:<17} total {_g(a['total'])}  (LM {_g(a['lm']).strip()}, loss head {_g(a['head']).strip()}, "
                 f"projector {_g(a['projector']).strip()}, towers {_g(a['towers']).strip()})")
    if not plan.flops:  # a released wrapper family: no FLOP model (the notes say so)
        L.extend(f"note: {n}" for n in plan.notes)
        return "\n".join(L)
    L.append("")
    f = plan.flops
    L.append(f"compute per sample: {f['total'] / 1e12:.2f} TFLOP (towers {f['towers'] / 1e12:.2f}, projector "
             f"{f['projector'] / 1e12:.3f}, LM {f['lm'] / 1e12:.2f}, attention {f['attention'] / 1e12:.2f}, head "
             f"{f['head'] / 1e12:.2f}, recompute {f['recompute'] / 1e12:.2f})")
    step = plan.step_seconds()
    per_step = s.micro_batch * s.accumulation * plan.gpus
    L.append(f"estimated step time at {plan.mfu:.0%} MFU of {plan.gpu_tflops:g} TFLOP/s per GPU: {step:.2f} s for "
             f"{per_step} samples ({per_step / step:.1f} samples/s; {100_000 / (per_step / step) / 3600:.2f} h per "
             f"100k samples); communication not modelled")
    for n in plan.notes:
        L.append(f"note: {n}")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.model.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a training YAML (configs/...)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as train.py takes them")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in the run (data-parallel ranks)")
    ap.add_argument("--gpu-mem", type=float, required=True, help="memory of one GPU in GiB (80 for an A100/H100 80GB)")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (default: H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time")
    ap.add_argument("--images", type=int, default=1, help="images per sample")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample (default: the config's max_length)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.config).is_file():
        raise PlanError(f"{args.config}: no such config file")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    with contextlib.redirect_stdout(io.StringIO()):  # the optimizer/group printing of library code
        plan = make_plan(cfg, args.gpus, args.gpu_mem, gpu_tflops=args.gpu_tflops, mfu=args.mfu,
                         images=args.images, seq=args.seq, source=args.config)
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
