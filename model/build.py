"""Building and loading VLMs: the layer above model.py (model.py defines the module; this file makes one).

Import order inside model/ (no cycle; tests/test_model_imports.py checks it):
config -> projector, token_rows, checkpoint, backbones, parts -> model -> llava -> build -> merge, export, quant,
bigbro (the BigBro repo's checkpoints).

Contract:
- `build_vlm(preset_or_config, **overrides) -> VLM` builds every part named by the config (a preset name
  from `model.model.PRESETS`, a dict of VLMConfig fields or a VLMConfig): the LM and its tokenizer through
  the backbone class `LM_BACKBONES[lm_backend]`, the towers (`model.parts`), the projector; frozen towers
  in `tower_dtype`. `init_from` (a transformers Llava directory) imports that model instead.
- `load_vlm(dir, **overrides) -> VLM` (also `VLM.from_pretrained`): a directory written by
  `VLM.save_pretrained` is rebuilt from its config (base models from their names/paths, the saved
  tokenizer) with its tensors loaded on top, LoRA adapters re-created from `lora/adapter_config.json`; a
  transformers Llava directory (config.json with model_type "llava") is imported (model/llava.py).
  Overrides are VLMConfig fields, plus `tower_path` (a path, or a list with one per tower) to point the
  towers at another copy of their base checkpoints. Returns the model in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..dataset.sample import UserError
from .checkpoint import (
    CONFIG_FILE,
    LORA_DIR,
    TOKENIZER_DIR,
    ModelDirError,
    load_trainable_weights,
    read_vlm_config,
)
from .config import VLMConfig
from .dtypes import torch_dtype
from .llava import import_llava
from .model import LM_BACKBONES, VLM, lm_width, resolve_config
from .parts import build_towers, named_source
from .paths import is_llava_dir
from .projector import build_projector
from .quant import QUANT_FILE, quantize_lm_4bit


def build_vlm(preset_or_config: str | dict | VLMConfig, **overrides: Any) -> VLM:
    """Build every part named by the config (a preset name, a dict or a VLMConfig)."""
    config = resolve_config(preset_or_config, **overrides)
    if config.init_from is not None:
        return import_llava(config.init_from, config)
    family = LM_BACKBONES[config.lm_backend]
    with named_source(config.lm, "language model (lm)"):
        lm = family.load_lm(config)
    with named_source(config.tokenizer or config.lm, "tokenizer"):
        tokenizer = family.load_tokenizer(config)
    towers = build_towers(config)
    if config.freeze_towers:
        towers.requires_grad_(False)
        towers.eval()
    grid = towers.grid if config.reduce is not None else None
    projector = build_projector(
        config.projector, int(towers.hidden_size), lm_width(lm), reduce=config.reduce,
        reduce_factor=config.reduce_factor, grid=grid,
    )
    vlm = VLM(config, towers, projector, lm, tokenizer)
    vlm = vlm.to(torch_dtype(config.dtype))
    if vlm.token_rows is not None:
        vlm.token_rows.float()  # trained rows keep fp32 master weights
    if config.tower_dtype is not None and config.freeze_towers:
        vlm.cast_frozen_towers()
    return vlm


def load_vlm(path: str | Path, **overrides: Any) -> VLM:
    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        if is_llava_dir(p):
            return import_llava(p, overrides or None).eval()
        raise ModelDirError(
            f"{p}: neither a VLM checkpoint ({CONFIG_FILE}) nor a transformers Llava directory "
            f"(config.json with model_type 'llava')"
        )
    config, _ = read_vlm_config(p)
    if (p / TOKENIZER_DIR).is_dir() and "tokenizer" not in overrides:
        config.tokenizer = str(p / TOKENIZER_DIR)
    overrides = dict(overrides)
    tower_path = overrides.pop("tower_path", None)
    if tower_path is not None:
        paths = [tower_path] if isinstance(tower_path, (str, Path)) else list(tower_path)
        if len(paths) != len(config.towers):
            raise UserError(f"tower_path: {len(paths)} path(s) given for {len(config.towers)} tower(s)")
        for spec, tp in zip(config.towers, paths):
            spec["name_or_path"] = str(tp)
    vlm = build_vlm(config, **overrides)
    _quantize_like(vlm, p)
    if (p / LORA_DIR / "adapter_config.json").is_file():
        # peft is heavy (it loads bitsandbytes and parts of inductor): imported only for a LoRA checkpoint.
        from peft import LoraConfig, get_peft_model

        vlm.lm = get_peft_model(vlm.lm, LoraConfig.from_pretrained(str(p / LORA_DIR)))
    load_trainable_weights(vlm, p)
    return vlm.eval()  # inference mode, as transformers' from_pretrained; training calls .train()


def _quantize_like(vlm: VLM, path: Path) -> None:
    """A QLoRA checkpoint: quantise the rebuilt LM as the run did (the adapters were trained on top of it)."""
    file = path / LORA_DIR / QUANT_FILE
    if not file.is_file():
        return
    settings = json.loads(file.read_text())
    quantize_lm_4bit(vlm, compute_dtype=getattr(torch, settings["compute_dtype"]),
                     quant_type=settings["quant_type"], double_quant=settings["double_quant"])


VLM.loader = load_vlm  # VLM.from_pretrained: model.py cannot import this module (it sits above it)
