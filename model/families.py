"""Released VLM families: one entry each, what the project needs to load, feed and train a released checkpoint.

`FAMILIES: dict[str, Family]` (a plain registry, keyed by the family name) and `family_of(path_or_config) ->
Family | None` (by the checkpoint's config.json `model_type`). Adding a family is one entry here plus its
parity test (tests/test_families.py).

A `Family` says:
- `model_types`: the config.json `model_type` values it covers;
- `hf_class`: the transformers class that loads it (with `AutoProcessor` for its processor);
- `native`: True when it imports into our own VLM (model/llava.py: LLaVA-1.5, llava-interleave, LLaVA-NeXT),
  False when it runs through the wrapper (model/released.py) behind the same surface as our VLM;
- `span`: how one image becomes its token span, in words (the processor is the reference; tests compare ids);
- `extra_inputs`: the processor outputs the model needs besides input_ids / attention_mask / pixel_values
  (e.g. `image_sizes`, `image_grid_thw`, `pixel_values_videos`);
- `vision`, `projector`, `lm`: the module-name prefixes of each part inside the transformers model (stages,
  freezing, default LoRA targets and the separate learning rates read them);
- `resolution_keys`: the processor settings a recipe may set (Qwen2-VL's `min_pixels` / `max_pixels`);
- `video`: whether it takes videos (`pixel_values_videos`);
- `serving`: "engine" (our serving engine drives it), "generate" (the server decodes with the model's own
  generate) or a one-line reason it is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    hf_class: str
    native: bool
    span: str
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    lm: tuple[str, ...]
    extra_inputs: tuple[str, ...] = ()
    resolution_keys: tuple[str, ...] = ()
    video: bool = False
    serving: str = "engine"
    notes: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    # Qwen-VL-Chat: imported into our VLM (model/qwenvl_chat.py; tests/test_qwenvl_chat.py is its parity test).
    # Its config.json says model_type "qwen", as a text-only Qwen-1 LM does: it is recognised by the `visual`
    # dict beside it (model.paths.is_qwenvl_chat_dir), so `model_types` stays empty here.
    "qwen_vl_chat": Family(
        name="qwen_vl_chat", model_types=(), hf_class="", native=True,
        span="Picture i: <img> + n_queries (256) x <imgpad> + </img>\n in the user text (Qwen-VL's tokenizer: "
             "151857 / 151859 / 151858); every row between <img> and </img> is an image feature",
        vision=("towers",), projector=("projector",), lm=("lm",),
        notes={"detect": "config.json model_type 'qwen' with a 'visual' dict", "remote_code": "not needed"},
    ),
}


def family_of(source: str | Path | dict) -> Family | None:
    """The family of a checkpoint directory (its config.json) or of a config dict, by `model_type`."""
    if isinstance(source, dict):
        cfg = source
    else:
        path = Path(source) / "config.json"
        if not path.is_file():
            return None
        cfg = json.loads(path.read_text(encoding="utf-8"))
    model_type = cfg.get("model_type")
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)
