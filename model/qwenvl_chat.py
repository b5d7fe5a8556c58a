"""Qwen-VL-Chat (and Qwen-VL) checkpoints imported natively: no remote code, our parts, the released names.

A released Qwen-VL(-Chat) directory holds config.json (model_type "qwen" plus a `visual` dict), safetensors
with the Qwen-1 LM's `transformer.*` / `lm_head.*` tensors and the vision side's `transformer.visual.*`, and
`qwen.tiktoken`. It becomes our VLM as three parts read from that one directory:
- the LM: our Qwen-1 (`qwen/`), which skips the `transformer.visual.*` tensors;
- the tower: backend `qwenvl` (visual/qwenvl.py: ViT + the 256-query resampler + ln_post + proj), whose rows
  are already at the LM's width;
- the projector: `identity` (the resampler's output goes straight into the LM's placeholder rows);
- the tokenizer: Qwen-1's vocabulary with Qwen-VL's nine extra specials (qwen/tokenizer.py), so an image is
  `<img>` + n_queries x `<imgpad>` + `</img>` in ChatML, as the released tokenizer lays out an image with an
  empty path (the released model overwrites every row between `<img>` and `</img>`, path bytes included, with
  the image features: the LM sees the same embeddings). The released query text names each image as
  `Picture i: <img>...</img>\\n`; a sample writes that text around its `<image>` marker.

Contract:
- `is_qwenvl_chat_dir(path) -> bool` (model/paths.py): config.json with model_type "qwen" and a `visual` dict.
- `qwenvl_chat_config(path, base=None) -> VLMConfig`: the VLMConfig that builds it (`build_vlm` /
  `load_vlm` / `init_from=` call it); fields of `base` other than the parts (dtype, lora, ...) are kept.
"""

from __future__ import annotations

from pathlib import Path

from .config import VLMConfig
from .paths import is_qwenvl_chat_dir

__all__ = ["is_qwenvl_chat_dir", "qwenvl_chat_config"]

# The fields that name the parts: taken from the checkpoint, whatever the base config said.
PART_FIELDS = (
    "lm", "lm_backend", "lm_config", "tokenizer", "towers", "projector", "reduce", "init_from", "image_mode",
)


def qwenvl_chat_config(path: str | Path, base: VLMConfig | dict | None = None) -> VLMConfig:
    """Our VLMConfig for the checkpoint at `path` (the LM, tower and tokenizer all read from it)."""
    src = str(Path(path))
    fields = base.to_dict() if isinstance(base, VLMConfig) else dict(base or {})
    fields = {k: v for k, v in fields.items() if k not in PART_FIELDS}
    tower = {"backend": "qwenvl", "name_or_path": src, "feature_layer": -1, "select": "patch"}
    return VLMConfig(**fields, lm=src, lm_backend="qwen", tokenizer=src, towers=[tower], projector="identity",
                     reduce=None, init_from=None, image_mode="resize")  # released: a bicubic resize to 448x448
