"""Saving and loading a VLM in our format (safetensors + JSON, never pickle).

A directory written by `save_vlm(vlm, dir, trainable_only)` holds:
- `vlm_config.json`: `{"config": <resolved VLMConfig>, "checkpoint": {"kind": "full" | "trainable",
  "tied": {alias: name}, "image_token_id", "tokens_per_image"}}`.
- `model.safetensors`: every tensor of the state dict ("full"), or ("trainable") the parameters that
  require grad (with the buffers of their modules), the whole projector, and any part that has no base checkpoint to point at (a scratch
  LM, a timm tower built with `pretrained: false`). Tensors sharing storage (tied embeddings) are
  stored once and listed under "tied".
- `tokenizer/` (when the VLM has one) and `processor.json` (the towers' preprocessing facts).
- `lora/adapter_config.json` when the LM is wrapped with peft LoRA adapters; loading wraps the rebuilt LM
  with the same peft config before the tensors go in. QLoRA adds `lora/quantization.json`: loading
  quantises the rebuilt LM the same way first (4-bit NF4, `model/quant.py`); stored 4-bit layers (a
  scratch LM) keep their codes and quantisation state and load bit for bit.

`load_vlm(dir, **overrides)` rebuilds the VLM from the config (base models come from their names/paths) and loads the
tensors on top: a "full" checkpoint must cover every key, a "trainable" one only its own keys. A
transformers Llava directory (`config.json` with model_type "llava") is imported instead (`model/llava.py`).
Overrides are VLMConfig fields, plus `tower_path` (a path, or a list with one per tower) to point the towers
at another copy of their base checkpoints.
`load_trainable_weights(vlm, dir)` loads a checkpoint's tensors into an existing VLM (resuming a run);
`read_weights(dir)` returns them (tied aliases included) for a caller that places them itself (FSDP shards).
`resolve_model_dir(path)`: a model directory as is; a run directory -> its `final/`, else its newest
`checkpoint-N/` holding a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import VLMConfig

CONFIG_FILE = "vlm_config.json"
LORA_DIR = "lora"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
PROCESSOR_FILE = "processor.json"


def _base_free_prefixes(vlm) -> list[str]:
    """State-dict prefixes of parts that cannot be rebuilt from a base checkpoint."""
    prefixes = []
    if vlm.config.init_from is None and vlm.config.is_scratch_lm:
        prefixes.append("lm.")
    if vlm.config.init_from is None:
        multi = len(vlm.config.towers) > 1
        for i, spec in enumerate(vlm.config.towers):
            if spec.get("pretrained") is False:
                prefixes.append(f"towers.towers.{i}." if multi else "towers.")
    return prefixes


def _select_keys(vlm, trainable_only: bool) -> list[str]:
    state = vlm.state_dict()
    if not trainable_only:
        return list(state)
    keep = {n for n, p in vlm.named_parameters() if p.requires_grad}
    for name, module in vlm.named_modules():
        # Buffers of a trained module (batch-norm statistics) change with it, so they travel with it.
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            keep |= {f"{name}.{b}" if name else b for b in module._buffers}
    prefixes = ["projector."] + _base_free_prefixes(vlm)
    return [k for k in state if k in keep or k.startswith(tuple(prefixes))]


def save_vlm(vlm, out_dir: str | Path, trainable_only: bool = False) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = vlm.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key in _select_keys(vlm, trainable_only):
        t = state[key]
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:  # a tied tensor: store once, remember the alias
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    config = vlm.config.to_dict()
    config["image_token_id"] = vlm.image_token_id  # resolved, so loading never guesses
    meta = {
        "config": config,
        "checkpoint": {
            "kind": "trainable" if trainable_only else "full",
            "tied": tied,
            "image_token_id": vlm.image_token_id,
            "tokens_per_image": vlm.tokens_per_image,
            "n_tensors": len(tensors),
        },
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if vlm.tokenizer is not None and hasattr(vlm.tokenizer, "save_pretrained"):
        vlm.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    (out / PROCESSOR_FILE).write_text(json.dumps(_processor_facts(vlm.towers), indent=2) + "\n")
    peft_config = getattr(vlm.lm, "peft_config", None)
    if peft_config:
        if list(peft_config) != ["default"]:
            raise ValueError(f"save: only one LoRA adapter named 'default' is supported, got {list(peft_config)}")
        peft_config["default"].save_pretrained(str(out / LORA_DIR))
    _save_quant_settings(vlm, out)
    return out


def _save_quant_settings(vlm, out: Path) -> None:
    """QLoRA: record the 4-bit quantisation, so loading quantises the rebuilt LM before the adapters go on."""
    from model.quant import QUANT_FILE, quant_settings

    settings = quant_settings(vlm.lm)
    if settings is not None:
        (out / LORA_DIR).mkdir(exist_ok=True)
        (out / LORA_DIR / QUANT_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def is_model_dir(path: Path) -> bool:
    if (path / CONFIG_FILE).is_file():
        return True
    native = path / "config.json"
    return native.is_file() and json.loads(native.read_text()).get("model_type") == "llava"


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or the model inside a run directory (`final/`, else the newest `checkpoint-N/`)."""
    p = Path(path)
    if is_model_dir(p):
        return p
    if is_model_dir(p / "final"):
        return p / "final"
    ckpts = sorted(
        (c for c in p.glob("checkpoint-*") if c.name.split("-")[-1].isdigit() and is_model_dir(c)),
        key=lambda c: int(c.name.split("-")[-1]),
    )
    if ckpts:
        return ckpts[-1]
    raise FileNotFoundError(
        f"{p}: no model here: expected {CONFIG_FILE} (or a Llava config.json) in it, in {p}/final or in a "
        f"{p}/checkpoint-N"
    )


def _processor_facts(towers) -> dict:
    facts = {"image_processor": towers.preprocess_config(), "num_tokens": int(towers.num_tokens)}
    if hasattr(towers, "towers"):  # MultiTower: each tower's own facts too
        facts["towers"] = [t.preprocess_config() for t in towers.towers]
    return facts


def read_vlm_config(path: str | Path) -> tuple[VLMConfig, dict]:
    file = Path(path) / CONFIG_FILE
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or "config" not in meta or "checkpoint" not in meta:
        raise ValueError(f"{file}: expected the keys 'config' and 'checkpoint'")
    return VLMConfig.from_dict(meta["config"]), meta["checkpoint"]


def load_vlm(path: str | Path, **overrides: Any):
    from model.model import build_vlm

    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        native = p / "config.json"
        if native.is_file() and json.loads(native.read_text()).get("model_type") == "llava":
            from model.llava import import_llava

            return import_llava(p, overrides or None).eval()
        raise FileNotFoundError(
            f"{p}: neither a VLM checkpoint ({CONFIG_FILE}) nor a transformers Llava directory "
            f"(config.json with model_type 'llava')"
        )
    config, ckpt = read_vlm_config(p)
    if (p / TOKENIZER_DIR).is_dir() and "tokenizer" not in overrides:
        config.tokenizer = str(p / TOKENIZER_DIR)
    overrides = dict(overrides)
    tower_path = overrides.pop("tower_path", None)
    if tower_path is not None:
        paths = [tower_path] if isinstance(tower_path, (str, Path)) else list(tower_path)
        if len(paths) != len(config.towers):
            raise ValueError(f"tower_path: {len(paths)} path(s) given for {len(config.towers)} tower(s)")
        for spec, tp in zip(config.towers, paths):
            spec["name_or_path"] = str(tp)
    vlm = build_vlm(config, **overrides)
    _quantize_like(vlm, p)
    if (p / LORA_DIR / "adapter_config.json").is_file():
        from peft import LoraConfig, get_peft_model

        vlm.lm = get_peft_model(vlm.lm, LoraConfig.from_pretrained(str(p / LORA_DIR)))
    load_trainable_weights(vlm, p)
    return vlm.eval()  # inference mode, as transformers' from_pretrained; training calls .train()


def _quantize_like(vlm, path: Path) -> None:
    """A QLoRA checkpoint: quantise the rebuilt LM as the run did (the adapters were trained on top of it)."""
    from model.quant import QUANT_FILE, quantize_lm_4bit

    file = path / LORA_DIR / QUANT_FILE
    if not file.is_file():
        return
    settings = json.loads(file.read_text())
    quantize_lm_4bit(vlm, compute_dtype=getattr(torch, settings["compute_dtype"]),
                     quant_type=settings["quant_type"], double_quant=settings["double_quant"])


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by state-dict name, tied aliases included."""
    p = Path(path)
    _, ckpt = read_vlm_config(p)
    file = p / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing weights file")
    tensors = load_file(str(file))
    for alias, name in ckpt.get("tied", {}).items():
        tensors[alias] = tensors[name]
    return tensors


def load_trainable_weights(vlm, path: str | Path) -> list[str]:
    """Load a checkpoint's tensors into an existing VLM (resume); returns the keys it did not cover.
    Every stored tensor must exist in the model; a "full" checkpoint must cover every key."""
    file = Path(path) / WEIGHTS_FILE
    _, ckpt = read_vlm_config(path)
    tensors = read_weights(path)
    if any(".weight.quant_state." in k for k in tensors):  # QLoRA: 4-bit codes + their quantisation state
        from model.quant import load_4bit_tensors

        tensors = load_4bit_tensors(vlm, tensors)
    missing, unexpected = vlm.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"{file}: {len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:5]}")
    if ckpt.get("kind") == "full" and missing:
        raise ValueError(f"{file}: a full checkpoint misses {len(missing)} tensor(s), e.g. {missing[:5]}")
    return missing
