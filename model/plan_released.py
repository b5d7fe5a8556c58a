"""The memory plan of a run that starts from a released checkpoint (`init_from=`), from its config.json alone.

`released_config(init_from) -> (Family, raw config dict) | None`: the checkpoint's config.json (a local
directory's, else the shipped fixture `configs/hub/<owner>--<name>.json`, else the hub's: `plan.config_file`)
and its family (model/families.py); None for a directory of ours.

- A native family (LLaVA-1.5, llava-interleave, LLaVA-NeXT: model/llava.py imports them) is planned as the VLM
  the import builds: `llava_vlm_config(raw, name, tmp) -> VLMConfig` maps the Llava config the way
  model/llava.py does (CLIP / SigLIP tower with its feature layer and select strategy, `mlp2x_gelu`, the text
  config as a transformers LM, LLaVA-NeXT's pinpoints and learned newline) with the tower's config written to
  `tmp`; model/plan.py then builds it on the meta device and plans it like any of our VLMs (towers, anyres
  tokens, activations, FLOPs).
- A wrapper family (Qwen2-VL, Qwen2.5-VL: model/released.py) is planned as the wrapper itself:
  `meta_released(family, raw, cfg, base_dtype)` builds its transformers class on the meta device from the
  config (no weights), wraps it (`ReleasedVLM` without a processor) and applies the run's stage
  (`model.stages.apply_stage`: LoRA on the LM's linears, the merger, vision by `vision_lr`), so the counts are
  what the run trains. `count_released(vlm)` counts parameters per part (vision / projector / lm / lora).
  Activations use plan.py's per-token LM formula through `PlanView` (the LM, head, merger widths and tower
  of the wrapper under the names plan.py reads); the wrapper's loss takes the logits of every position, so the
  loss head counts all `seq` rows. Compute (FLOPs, step time) is not estimated for wrapper families: the plan
  says so.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig

from ..core.errors import UserError
from .config import VLMConfig
from .dtypes import torch_dtype
from .families import Family, family_of
from .llava import VISION_BACKENDS, _select
from .released import ReleasedVLM
from .stages import apply_stage, part_of


def released_config(init_from: str, config_file) -> tuple[Family, dict] | None:
    """(family, config.json dict) of a released checkpoint named by `init_from`; None when it is not one."""
    path = Path(init_from)
    if path.exists() and not (path / "config.json").is_file():
        return None  # a directory of ours (a model or a run): plan.py reads its own config
    try:
        raw = json.loads(config_file(init_from, "init_from").read_text())
    except UserError:  # nothing anywhere (a run not trained yet, an unknown id): plan.py says what to name
        return None
    family = family_of(raw)
    return None if family is None else (family, raw)


def llava_vlm_config(raw: dict, name: str, tmp: Path) -> VLMConfig:
    """The VLMConfig model/llava.py's import gives for this Llava / LLaVA-NeXT config (weights not needed)."""
    vision = dict(raw["vision_config"])
    backend = VISION_BACKENDS.get(vision.get("model_type"))
    if backend is None:
        raise ValueError(f"{name}: vision_config.model_type={vision.get('model_type')!r}; valid: {sorted(VISION_BACKENDS)}")
    tower_file = tmp / "vision_config.json"
    tower_file.write_text(json.dumps(vision))
    text = dict(raw["text_config"])
    d: dict[str, Any] = {
        "lm": "scratch", "lm_backend": "qwen" if text.get("model_type") == "qwen2" else "hf", "lm_config": text,
        "towers": [{"backend": backend, "name_or_path": str(tower_file), "pretrained": False,
                    "feature_layer": int(raw.get("vision_feature_layer", -2)),
                    "select": _select(backend, raw.get("vision_feature_select_strategy", "default"))}],
        "projector": "mlp2x_gelu", "image_token_id": int(raw.get("image_token_index", raw.get("image_token_id", 0))),
        "tokenizer": None,
    }
    if raw.get("model_type") == "llava_next":
        d.update(image_grid_pinpoints=[[int(h), int(w)] for h, w in raw["image_grid_pinpoints"]],
                 image_newline=True, multi_image="anyres", anyres_max=None)
    return VLMConfig.from_dict(d)


def meta_released(family: Family, raw: dict, cfg, base_dtype: str) -> ReleasedVLM:
    """The wrapper on the meta device, `base_dtype` weights, with the run's stage applied."""
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = getattr(transformers, family.hf_class)(config).to(torch_dtype(base_dtype))
    vlm = ReleasedVLM(family, model, None, source=str(cfg.init_from))
    lora = copy.copy(cfg.lora)
    lora.qlora = False  # 4-bit bases are not modelled; the plan counts bf16 bases
    apply_stage(vlm, cfg, lora)
    return vlm


def count_released(vlm: ReleasedVLM, record: type) -> dict[str, Any]:
    """Parameters per part (`vision`, `projector`, `lm`, `lora`) as `record()`s (plan.py's PartCount: total,
    trainable, bytes)."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for name, p in vlm.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        c = out.setdefault("lora" if "lora_" in name else part_of(name), record())
        c.total += p.numel()
        c.trainable += p.numel() if p.requires_grad else 0
        c.bytes += p.numel() * p.element_size()
    return out


class _LMView(nn.Module):
    """The wrapper's language model and head under the names plan.py's LM formula reads."""

    def __init__(self, body: nn.Module, head: nn.Module, config: Any):
        super().__init__()
        self.body, self.head, self.config = body, head, config

    def get_output_embeddings(self) -> nn.Module:
        return self.head


class PlanView:
    """What `plan.activation_bytes` reads from our VLM (`lm`, `loss_chunk_size`, `projector`, `towers`), for a
    wrapper: its LM (LoRA inside), its head, the merger's widths and its vision tower."""

    def __init__(self, vlm: ReleasedVLM, seq: int):
        hf = vlm._hf()
        body = hf.get_submodule(vlm.family.lm[0])
        self.lm = _LMView(body, hf.get_output_embeddings(), body.config)
        self.loss_chunk_size = seq  # full logits: every position's row
        merger = hf.get_submodule(vlm.family.projector[0])
        linears = [m for m in merger.modules() if isinstance(m, nn.Linear)]
        self.projector = SimpleNamespace(in_dim=linears[0].in_features, out_dim=linears[-1].out_features)
        vision = nn.ModuleList(hf.get_submodule(p) for p in vlm.family.vision)
        # A training tower's activations follow our towers' layout, which this one does not have: not counted
        # (the plan notes it); a frozen one runs under no_grad and keeps none.
        self.vision_trains = any(p.requires_grad for p in vision.parameters())
        self.towers = nn.ModuleList()
