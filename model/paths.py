"""Where a model lives on disk: light (no torch), so entry points check a path before loading anything.

Contract:
- `CONFIG_FILE` ("vlm_config.json") marks a directory written by `VLM.save_pretrained`.
- `is_model_dir(path)`: such a directory, or a transformers Llava directory (`is_llava_dir`: config.json,
  model_type in `LLAVA_MODEL_TYPES`: "llava", or "llava_next" for LLaVA-NeXT, whose anyres model/llava.py maps).
- `resolve_model_dir(path) -> Path`: a model directory as is; a run directory -> its `final/`, else its
  newest `checkpoint-N/` holding a model. A path that does not exist, or holds no model, raises
  `ModelDirError` (a UserError) saying which and what to give instead. A path that does not exist but reads
  as a hub id (`org/name`, e.g. a released `Qwen/Qwen2-VL-2B-Instruct` in a configs/released/ recipe) is
  fetched once (`snapshot_download`, the hub cache) and its directory returned; offline or unknown, the
  same one-line `ModelDirError`.
- `is_qwenvl_chat_dir(path)`: a released Qwen-VL(-Chat) directory (config.json: model_type "qwen" and a
  `visual` dict), built from our parts by model/qwenvl_chat.py; `resolve_model_dir` takes it as is.
- `is_bigbro_dir(path)`: a checkpoint of the BigBro repo (`BIGBRO_FILES` + adapter_config.json, no
  `CONFIG_FILE`), imported by model/bigbro.py once its base models are named; `resolve_model_dir` says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import snapshot_download

from ..core.errors import UserError
from .families import family_of

CONFIG_FILE = "vlm_config.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the hub spells repositories
BIGBRO_FILES = ("adapter_model.bin", "other_params.bin")  # the BigBro repo's LoRA and projector (torch.save)
LLAVA_MODEL_TYPES = ("llava", "llava_next")  # transformers families model/llava.py imports


def is_model_dir(path: Path) -> bool:
    """Ours (vlm config), a Llava one, or a released wrapper family's (released checkpoint or trained run)."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() or is_llava_dir(p) or (p / "released.json").is_file() or (
        family_of(p) is not None)


def is_qwenvl_chat_dir(path: str | Path | None) -> bool:
    """A Qwen-VL(-Chat) checkpoint directory: config.json with model_type "qwen" and a `visual` dict."""
    if path is None:
        return False
    try:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == "qwen" and isinstance(raw.get("visual"), dict)


def is_llava_dir(path: Path) -> bool:
    """A transformers Llava or LLaVA-NeXT directory; any other (or unreadable) config.json is not one."""
    native = Path(path) / "config.json"
    try:
        return native.is_file() and json.loads(native.read_text()).get("model_type") in LLAVA_MODEL_TYPES
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False  # some other config.json: not a model of ours


def is_bigbro_dir(path: str | Path) -> bool:
    p = Path(path)
    return (not (p / CONFIG_FILE).is_file() and (p / "adapter_config.json").is_file()
            and all((p / f).is_file() for f in BIGBRO_FILES))


class ModelDirError(UserError, FileNotFoundError):
    """A model directory that does not exist or holds no model."""


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or the model inside a run directory (`final/`, else the newest `checkpoint-N/`)."""
    p = Path(path)
    if not p.exists() and _HUB_ID.fullmatch(str(path)):
        try:  # a hub model named by the user: the one network access, cached
            return Path(snapshot_download(str(path)))
        except Exception as e:  # offline, unknown id, no access: the user's to fix, in one line
            raise ModelDirError(f"model directory {p} does not exist and the hub model {path} could not be fetched "
                                f"({type(e).__name__}); give a local directory or check the id / network") from None
    if not p.exists():
        raise ModelDirError(f"model directory {p} does not exist; give a run directory (its final/ or newest "
                            f"checkpoint-N/ is used) or a directory written by save_pretrained / model.merge")
    if not p.is_dir():
        raise ModelDirError(f"{p} is a file, not a model directory")
    if is_model_dir(p) or is_qwenvl_chat_dir(p):
        return p
    if is_model_dir(p / "final"):
        return p / "final"
    ckpts = sorted(
        (c for c in p.glob("checkpoint-*") if c.name.split("-")[-1].isdigit() and is_model_dir(c)),
        key=lambda c: int(c.name.split("-")[-1]),
    )
    if ckpts:
        return ckpts[-1]
    if is_bigbro_dir(p):
        raise ModelDirError(f"{p} is a BigBro checkpoint ({', '.join(BIGBRO_FILES)}), which does not record its base "
                            f"models: name them (test.py --lm/--base_language_model and --tower/--base_value_model; "
                            f"train.py model.lm=... model.towers=[...] or the same two flags) and it is converted once")
    raise ModelDirError(
        f"{p} holds no model: expected {CONFIG_FILE} (or a Llava / LLaVA-NeXT config.json) in it, in {p}/final or in a "
        f"{p}/checkpoint-N (a run that has not saved yet has none)"
    )
