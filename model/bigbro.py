"""Checkpoints of the BigBro repo ("Basic Visual Language Model"): recognised, read safely, converted once.

A BigBro checkpoint directory (its train.py's `--output_dir/checkpoint-N`) holds, all written by torch.save:
- `adapter_model.bin` + `adapter_config.json`: peft LoRA on the Qwen-1 LM (keys like
  `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, targets such as `c_attn|w1|w2`);
- `other_params.bin`: the feature projector's state dict, Linear -> GELU -> Linear
  (`0.weight`, `0.bias`, `2.weight`, `2.bias`) = our `mlp2x_gelu`.
It does not record its base models: its test.py names them (`--base_language_model`, `--base_value_model`).

What its model computed, reproduced here by `bigbro_config`: the tower's `last_hidden_state` without its
first token (CLIP: the CLS; SigLIP, which has none: a real patch, so 728 of so400m/14-384's 729 rows:
tower options `last_hidden_state=True`, `select="drop_first"`), projected, and written where the prompt's
one `<|extra_0|>` stood (no image start/end tokens around them), in ChatML with its system line and
user prefix (the `bigbro` chat template, dataset/chat_templates.py).

Contract:
- `is_bigbro_dir(path)`: the two .bin files and adapter_config.json, and no vlm_config.json.
- `read_bin(file) -> {name: Tensor}`: `torch.load(weights_only=True)` only; a file that holds anything but a
  dict of tensors (another pickled object, a damaged file) raises `BigBroError` (a UserError, one line).
- `bigbro_config(lm, tower) -> dict` of VLMConfig fields; the tower family (CLIP / SigLIP) is read from its
  config.json.
- `convert_bigbro(src, lm, tower) -> Path`: `src/converted/` in our layout (model/checkpoint.py: LoRA +
  projector as safetensors, `lora/adapter_config.json`, tokenizer, `bigbro_import.json` recording the
  source files and the base names). Made once: reused while that record matches, rebuilt when the .bin
  files or the base names change. The source files are only read; the conversion is built in a temporary
  folder beside it and renamed into place under a lock (several processes may start at once).
- `load_bigbro(src, lm, tower) -> VLM` (eval mode): converts when needed, then loads the conversion.
"""

from __future__ import annotations

import fcntl
import json
import pickle
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

from ..core.errors import UserError
from .model import VLM, build_vlm, load_vlm
from .parts import named_source
from .paths import BIGBRO_FILES, CONFIG_FILE, is_bigbro_dir

__all__ = ["BigBroError", "bigbro_config", "convert_bigbro", "is_bigbro_dir", "load_bigbro", "read_bin"]

CONVERTED_DIR = "converted"
RECORD_FILE = "bigbro_import.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_BIN, PROJECTOR_BIN = BIGBRO_FILES
# The tower families the BigBro repo used -> (our backend, the image mode its processor amounts to).
TOWER_FAMILIES = {
    "clip": ("hf_clip", "crop"), "clip_vision_model": ("hf_clip", "crop"),  # shortest edge, centre crop
    "siglip": ("hf_siglip", "resize"), "siglip_vision_model": ("hf_siglip", "resize"),  # squashed square
}


class BigBroError(UserError, ValueError):
    """A BigBro checkpoint that cannot be imported; the message names the file and what to do."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def read_bin(file: str | Path) -> dict[str, torch.Tensor]:
    """A torch.save'd dict of tensors, read with weights_only=True (no other pickled object is ever built)."""
    file = Path(file)
    if not file.is_file():
        raise BigBroError(f"{file}: missing; a BigBro checkpoint holds {ADAPTER_BIN} and {PROJECTOR_BIN}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BigBroError(f"{file}: refused: it holds more than tensors ({_first_line(e)}); only a dict of "
                          f"tensors written by torch.save is read (weights_only=True)") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise BigBroError(f"{file}: not a torch.save file of tensors ({_first_line(e)})") from None
    if not isinstance(obj, dict) or not obj:
        raise BigBroError(f"{file}: refused: expected a dict of name -> tensor, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise BigBroError(f"{file}: refused: entry {bad[0]!r} is not a tensor; expected a dict of name -> tensor")
    return obj


def tower_family(tower: str) -> tuple[str, str]:
    """(backend, image_mode) of a CLIP / SigLIP tower, from its config.json (a hub id or a local directory)."""
    with named_source(tower, "vision tower (--base_value_model)"):
        model_type = transformers.PretrainedConfig.get_config_dict(tower)[0].get("model_type")
    if model_type not in TOWER_FAMILIES:
        raise BigBroError(f"vision tower {tower}: config.json model_type={model_type!r}; a BigBro checkpoint "
                          f"was trained on a CLIP or SigLIP tower ({', '.join(sorted(TOWER_FAMILIES))})")
    return TOWER_FAMILIES[model_type]


def bigbro_config(lm: str, tower: str) -> dict:
    """VLMConfig fields of the BigBro repo's model on these base models."""
    backend, image_mode = tower_family(tower)
    spec = {"backend": backend, "name_or_path": str(tower), "feature_layer": -1, "select": "drop_first",
            "last_hidden_state": True}
    return dict(lm=str(lm), lm_backend="qwen", towers=[spec], image_mode=image_mode, projector="mlp2x_gelu",
                chat_template="bigbro")


def _fingerprint(src: Path) -> dict:
    files = [ADAPTER_BIN, PROJECTOR_BIN, ADAPTER_CONFIG]
    return {f: [(src / f).stat().st_size, (src / f).stat().st_mtime_ns] for f in files}


def _record(src: Path, lm: str, tower: str) -> dict:
    return {"source": _fingerprint(src), "lm": str(lm), "tower": str(tower)}


def _current(src: Path, lm: str, tower: str) -> Path | None:
    """The conversion in `src/converted` when it was made from these files and base names."""
    out = src / CONVERTED_DIR
    try:
        record = json.loads((out / RECORD_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return out if record == _record(src, lm, tower) and (out / CONFIG_FILE).is_file() else None


def _lora_config(src: Path):
    """The adapters' peft LoraConfig, keeping the fields this peft knows; set up to train (not inference)."""
    from peft import LoraConfig  # heavy: only for a LoRA import

    file = src / ADAPTER_CONFIG
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BigBroError(f"{file}: not readable JSON ({_first_line(e)})") from None
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise BigBroError(f"{file}: expected a peft LoRA config (peft_type LORA)")
    known = set(LoraConfig.__dataclass_fields__)
    kept = {k: v for k, v in raw.items() if k in known and k not in ("peft_type", "task_type", "inference_mode")}
    try:
        return LoraConfig(**kept, inference_mode=False)
    except (TypeError, ValueError) as e:
        raise BigBroError(f"{file}: {_first_line(e)}") from None


def _adapter_key(key: str) -> str:
    """A saved adapter key with the LM's own names: whatever wrapped the LM before `transformer.` goes."""
    at = key.find("transformer.")
    return "base_model.model." + key[at:] if at >= 0 else key


def _load_adapters(vlm: VLM, src: Path) -> None:
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # heavy: LoRA only

    try:
        vlm.lm = get_peft_model(vlm.lm, _lora_config(src))
    except ValueError as e:  # e.g. target modules the LM does not have
        raise BigBroError(f"{src / ADAPTER_CONFIG}: {_first_line(e)}") from None
    state = {_adapter_key(k): v for k, v in read_bin(src / ADAPTER_BIN).items()}
    expected = get_peft_model_state_dict(vlm.lm)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise BigBroError(f"{src / ADAPTER_BIN}: does not fit the LoRA of {ADAPTER_CONFIG} on this LM "
                          f"(missing {missing[:3]}, unexpected {extra[:3]}); is --base_language_model the LM it "
                          f"was trained on?")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise BigBroError(f"{src / ADAPTER_BIN}: {k} has shape {tuple(v.shape)}, the LM's adapter "
                              f"{tuple(expected[k].shape)}; is --base_language_model the LM it was trained on?")
    set_peft_model_state_dict(vlm.lm, state)


def _load_projector(vlm: VLM, src: Path) -> None:
    file = src / PROJECTOR_BIN
    state = {k.removeprefix("feature_proj."): v for k, v in read_bin(file).items()}
    mlp = vlm.projector.mlp  # Linear(vision, lm), GELU, Linear(lm, lm): keys 0.* and 2.*
    want = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        raise BigBroError(f"{file}: projector tensors {got} do not fit Linear -> GELU -> Linear between this tower "
                          f"and LM {want}; are --base_language_model / --base_value_model the ones it was "
                          f"trained on?")
    with torch.no_grad():
        for k, p in mlp.state_dict().items():
            p.copy_(state[k])


def _build_imported(src: Path, lm: str, tower: str) -> VLM:
    """Our VLM with the BigBro checkpoint's adapters and projector in it."""
    vlm = build_vlm(bigbro_config(lm, tower))
    _load_projector(vlm, src)
    _load_adapters(vlm, src)
    lc = vlm.lm.peft_config["default"]
    targets = lc.target_modules if isinstance(lc.target_modules, str) else "|".join(sorted(lc.target_modules))
    vlm.config.lora = {"r": lc.r, "alpha": lc.lora_alpha, "dropout": lc.lora_dropout, "targets": targets}
    return vlm


@contextmanager
def _locked(src: Path):
    """One process converts at a time (torchrun starts several); the others then find the conversion."""
    try:
        handle = open(src / f".{CONVERTED_DIR}.lock", "w")  # noqa: SIM115 - held across the yield
    except OSError as e:
        raise BigBroError(f"{src}: cannot write the conversion beside the checkpoint ({_first_line(e)}); "
                          f"copy the checkpoint directory somewhere writable and give that") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _convert(src: Path, lm: str, tower: str) -> tuple[Path, VLM | None]:
    """(conversion dir, the model built for it or None when an existing conversion was reused)."""
    with _locked(src):
        done = _current(src, lm, tower)
        if done is not None:
            return done, None
        vlm = _build_imported(src, lm, tower)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CONVERTED_DIR}-", dir=src))
        try:
            vlm.save_pretrained(tmp, trainable_only=True)
            (tmp / RECORD_FILE).write_text(json.dumps(_record(src, lm, tower), indent=2) + "\n")
            out = src / CONVERTED_DIR
            if out.exists():
                shutil.rmtree(out)  # made from other files or base names: ours to replace
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"converted the BigBro checkpoint {src} -> {out} (base LM {lm}, vision tower {tower})",
              file=sys.stderr)
        return out, vlm


def _check_src(src: str | Path, lm: str | None, tower: str | None) -> Path:
    p = Path(src)
    if not is_bigbro_dir(p):
        raise BigBroError(f"{p}: not a BigBro checkpoint (expected {ADAPTER_BIN}, {PROJECTOR_BIN} and "
                          f"{ADAPTER_CONFIG})")
    if not lm or not tower:
        raise BigBroError(f"{p} is a BigBro checkpoint, which does not record its base models: name them "
                          f"(test.py --lm/--base_language_model and --tower/--base_value_model; train.py "
                          f"model.lm=... and model.towers=[...])")
    return p


def convert_bigbro(src: str | Path, lm: str, tower: str) -> Path:
    """The checkpoint converted to our layout in `src/converted` (made once; see the module docstring)."""
    return _convert(_check_src(src, lm, tower), str(lm), str(tower))[0]


def load_bigbro(src: str | Path, lm: str, tower: str) -> VLM:
    """The imported model in eval mode (the conversion made first when there is none for these files)."""
    out, vlm = _convert(_check_src(src, lm, tower), str(lm), str(tower))
    return (vlm if vlm is not None else load_vlm(out)).eval()
