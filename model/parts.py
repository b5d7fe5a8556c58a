"""Building the parts of a VLM from a `VLMConfig`: the LM, its tokenizer and the vision towers.

Contract:
- `build_lm(config) -> nn.Module`: `lm_backend="qwen"` -> `qwen.QWenLMHeadModel` (from a checkpoint,
  or random from `lm_config` for a scratch LM); `"hf"` -> `transformers.AutoModelForCausalLM`
  (from a checkpoint, or `from_config` of a `model_type` dict for a scratch LM).
- `build_tokenizer(config)`: `qwen.load_tokenizer` (qwen; for hf too when the files are a Qwen
  vocabulary, else `AutoTokenizer`) from `config.tokenizer`, else from the LM directory when it holds
  tokenizer files; None when there is none.
- `build_towers(config) -> VisionTower | MultiTower`: one tower, or several concatenated by channel.
- `lm_width(lm)`: the width of the LM's input embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model import dtypes
from model.config import VLMConfig

TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def torch_dtype(name: str) -> torch.dtype:
    return dtypes.torch_dtype(name)  # "auto" decided (and logged once) in model/dtypes.py


def build_lm(config: VLMConfig) -> nn.Module:
    if config.lm_backend == "qwen":
        from qwen import QWenConfig, QWenLMHeadModel

        if config.is_scratch_lm:
            return QWenLMHeadModel(QWenConfig.from_dict(config.scratch_lm_config()))
        return QWenLMHeadModel.from_pretrained(config.lm, dtype=torch_dtype(config.dtype))
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.is_scratch_lm:
        cfg = dict(config.scratch_lm_config())
        if "model_type" not in cfg:
            raise ValueError("VLMConfig.lm_config for an hf scratch LM needs 'model_type' (e.g. 'llama')")
        hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return AutoModelForCausalLM.from_config(hf_cfg)
    return AutoModelForCausalLM.from_pretrained(config.lm, dtype=torch_dtype(config.dtype))


def _has_tokenizer_files(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def build_tokenizer(config: VLMConfig):
    """The tokenizer named by the config, or the LM's own, or None (scratch LM without one)."""
    path = config.tokenizer
    if path is None:
        if config.is_scratch_lm:
            return None
        if Path(config.lm).exists():
            if not _has_tokenizer_files(config.lm):
                return None
            path = config.lm
        else:
            path = config.lm  # a hub id: resolved below
    if not Path(path).exists():
        from huggingface_hub import snapshot_download

        # A hub id named by the user: fetch (or find in the cache) only the tokenizer files.
        path = snapshot_download(path, allow_patterns=list(TOKENIZER_FILES) + ["*.txt", "*.json"])
    from qwen import load_tokenizer

    if config.lm_backend == "qwen":
        return load_tokenizer(path)
    try:
        # The Qwen interface (ChatML ids, image span ids) whenever the files provide it, so the dataset
        # template and chat work for an hf LM with a Qwen vocabulary too.
        return load_tokenizer(path)
    except (ValueError, FileNotFoundError):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)


def build_towers(config: VLMConfig) -> nn.Module:
    from visual.multi import MultiTower
    from visual.registry import build_tower

    towers = []
    for spec in config.towers:
        spec = dict(spec)
        if "dtype" in spec:
            raise ValueError(f"VLMConfig.towers: set the dtype with VLMConfig.dtype, not per tower ({spec})")
        towers.append(build_tower(spec.pop("backend"), spec.pop("name_or_path"), image_mode=config.image_mode,
                                  dtype=torch_dtype(config.dtype), **spec))
    return towers[0] if len(towers) == 1 else MultiTower(towers)


def lm_width(lm: nn.Module) -> int:
    return int(lm.get_input_embeddings().weight.shape[1])
