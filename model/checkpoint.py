"""Saving and loading a VLM in our format (safetensors + JSON, never pickle).

A directory written by `save_vlm(vlm, dir, trainable_only)` holds:
- `vlm_config.json`: `{"config": <resolved VLMConfig>, "checkpoint": {"kind": "full" | "trainable",
  "tied": {alias: name}, "image_token_id", "tokens_per_image" (rows of one square crop; fixed mode: of
  every image), and in a variable resolution mode "resolution": {"mode", "max_tokens_per_image"}}}`; the
  resolution keys themselves (image_grid_pinpoints, max_pixels, ...) are in the config.
- `model.safetensors`: every tensor of the state dict ("full"), or ("trainable") the parameters that
  require grad (with the buffers of their modules), the whole projector, and any part that has no base checkpoint to point at (a scratch
  LM, a timm tower built with `pretrained: false`). Tensors sharing storage (tied embeddings) are
  stored once and listed under "tied".
- `tokenizer/` (when the VLM has one) and `processor.json` (the towers' preprocessing facts).
- `lora/adapter_config.json` when the LM is wrapped with peft LoRA adapters; loading wraps the rebuilt LM
  with the same peft config before the tensors go in. QLoRA adds `lora/quantization.json`: loading
  quantises the rebuilt LM the same way first (4-bit NF4, `model/quant.py`); stored 4-bit layers (a
  scratch LM) keep their codes and quantisation state and load bit for bit.

The resolved placeholder id, trainable tokens and chat template are written into the config, so a
rebuilt model is the same model. Loading (rebuilding from the config, then these tensors on top) is
`model.model.load_vlm` (= `VLM.from_pretrained`), which sits above this module; this one only reads and
writes the files.
`load_trainable_weights(vlm, dir)` loads a checkpoint's tensors into an existing VLM (loading, resuming):
a "full" checkpoint must cover every key, a "trainable" one only its own keys.
`read_vlm_config(dir) -> (VLMConfig, checkpoint facts)`.
`read_weights(dir)` returns a checkpoint's tensors (tied aliases included) for a caller that places them
itself (FSDP shards). QLoRA checkpoints hold 4-bit codes with their quantisation state (model/quant.py).
Finding a model directory (`resolve_model_dir`) is model/paths.py's job (light: no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import UserError
from .config import PROJECTOR_PREFIXES, VLMConfig
from .paths import CONFIG_FILE, ModelDirError
from .quant import QUANT_FILE, load_4bit_tensors, quant_settings

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
    prefixes = list(PROJECTOR_PREFIXES) + _base_free_prefixes(vlm)
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
    # Resolved, so loading never guesses (and a tokenizer saved with added tokens gives the same model).
    config["image_token_id"] = vlm.image_token_id
    config["trainable_tokens"] = list(vlm.backbone.trainable_tokens)
    if vlm.backbone.chat_format is not None:
        config["chat_template"] = vlm.backbone.chat_format.template.name
    meta = {
        "config": config,
        "checkpoint": {
            "kind": "trainable" if trainable_only else "full",
            "tied": tied,
            "image_token_id": vlm.image_token_id,
            "tokens_per_image": vlm.tokens_per_image,  # rows per square crop (fixed mode: per image)
            **_resolution_facts(vlm),
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


def _resolution_facts(vlm) -> dict:
    """What an image costs under the model's resolution: `tokens_per_image` is a square crop's rows, which
    a variable mode's image does not get, so its mode and most tokens per image are recorded beside it."""
    res = getattr(vlm, "resolution", None)
    if res is None or not res.variable:
        return {}
    return {"resolution": {"mode": res.mode, "max_tokens_per_image": int(res.max_tokens())}}


def _save_quant_settings(vlm, out: Path) -> None:
    """QLoRA: record the 4-bit quantisation, so loading quantises the rebuilt LM before the adapters go on."""
    settings = quant_settings(vlm.lm)
    if settings is not None:
        (out / LORA_DIR).mkdir(exist_ok=True)
        (out / LORA_DIR / QUANT_FILE).write_text(json.dumps(settings, indent=2) + "\n")


class CheckpointError(UserError, ValueError):
    """A model directory whose files are damaged or do not match the model's config."""


def _processor_facts(towers) -> dict:
    facts = {"image_processor": towers.preprocess_config(), "num_tokens": int(towers.num_tokens)}
    if hasattr(towers, "towers"):  # MultiTower: each tower's own facts too
        facts["towers"] = [t.preprocess_config() for t in towers.towers]
    return facts


def read_vlm_config(path: str | Path) -> tuple[VLMConfig, dict]:
    file = Path(path) / CONFIG_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); the model directory is damaged") from None
    if not isinstance(meta, dict) or "config" not in meta or "checkpoint" not in meta:
        raise CheckpointError(f"{file}: expected the keys 'config' and 'checkpoint'; the model directory is damaged")
    try:
        return VLMConfig.from_dict(meta["config"]), meta["checkpoint"]
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by state-dict name, tied aliases included."""
    return _read_weights(Path(path), read_vlm_config(path)[1])


def _read_weights(p: Path, ckpt: dict) -> dict[str, torch.Tensor]:
    """`read_weights` with the checkpoint metadata already read (vlm_config.json parsed once)."""
    file = p / WEIGHTS_FILE
    if not file.is_file():
        raise ModelDirError(f"{file}: missing weights file; the model directory is incomplete")
    tensors = load_file(str(file))
    for alias, name in ckpt.get("tied", {}).items():
        tensors[alias] = tensors[name]
    return tensors


def load_trainable_weights(vlm, path: str | Path) -> list[str]:
    """Load a checkpoint's tensors into an existing VLM (loading, resuming); returns the keys it did not
    cover. Every stored tensor must exist in the model; a "full" checkpoint must cover every key."""
    file = Path(path) / WEIGHTS_FILE
    _, ckpt = read_vlm_config(path)
    tensors = _read_weights(Path(path), ckpt)
    if any(".weight.quant_state." in k for k in tensors):  # QLoRA: 4-bit codes + their quantisation state
        tensors = load_4bit_tensors(vlm, tensors)
    missing, unexpected = vlm.load_state_dict(tensors, strict=False)
    if unexpected:
        raise CheckpointError(f"{file}: {len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:5]}; "
                            f"the weights do not belong to this model's config")
    if ckpt.get("kind") == "full" and missing:
        raise CheckpointError(f"{file}: a full checkpoint misses {len(missing)} tensor(s), e.g. {missing[:5]}")
    return missing
