"""`VLMConfig` (what a VLM is built from) and `PRESETS`, the registry of backbone pairs.

Contract:
- `VLMConfig` is a plain dataclass, JSON-serialisable with `to_dict()` / `from_dict()`.
  - `lm`: a hub id or local directory, or `"scratch"` / `"scratch:<json>"` for a randomly initialised
    LM built from `lm_config` (the JSON after `scratch:` is merged over `lm_config`).
  - `lm_backend`: a key of `model.model.LM_BACKBONES`: `"qwen"` (our `qwen.QWenLMHeadModel`) or `"hf"`
    (any transformers causal LM, fed through `inputs_embeds`); checked when the model is built. `lm_config` for a scratch LM is a `QWenConfig` dict (qwen) or a
    transformers config dict with `model_type` (hf).
  - `towers`: list of `{backend, name_or_path, feature_layer, select, ...}`; extra keys go to
    `visual.build_tower` unchanged (e.g. `pretrained: false` for timm). Two or more towers are
    concatenated along channels (`visual.MultiTower`).
  - `projector`, `reduce`, `reduce_factor`: see `model/projector.py`.
  - `image_token_id`: override of the placeholder id (else the tokenizer's, else the LM config's).
  - `lora`: the LoRA settings a run applied to the LM (informational; the adapters' exact peft config
    travels in the checkpoint's `lora/adapter_config.json`). None when the LM has no adapters.
  - `dtype`: `"auto"` (default: bf16 base weights where the device computes bf16 natively, else fp32;
    see `model/dtypes.py`), `"float32"`, `"bfloat16"` or `"float16"`. What trains is put in fp32 by the
    trainer (fp32 master weights).
  - `tower_dtype`: `"auto" | "float32" | "bfloat16"` for FROZEN towers only (they run under no_grad, so
    bf16 halves their time and memory); None = `dtype`. Trainable towers always use `dtype`.
  - `init_from`: a transformers Llava directory the whole model was imported from; building from the
    config re-imports it (so a trainable-only checkpoint can point at it).
  - `chat_template`: the LM's chat template by name (dataset/chat_templates.py); None = picked from
    the tokenizer's own template or the LM's model type.
  - `trainable_tokens`: tokens whose input-embedding rows train (with the projector's learning rate);
    None = the tokens added to the tokenizer (e.g. `image_delimiters` an LM lacked), [] = none. Qwen's
    own tokens are off by default: list them (e.g. `["<|extra_1|>", "<|extra_2|>"]`) to train them.
  - `image_delimiters`: True adds `<image_start>` / `<image_end>` around each image for an LM whose
    tokenizer has no image start/end tokens (Qwen has them and always uses them).
  - Resolution (visual/resolution.py; all off by default = one fixed square crop per image):
    `image_grid_pinpoints` (a list of [height, width], multiples of the tower's image size) turns on
    LLaVA-NeXT anyres; `image_newline` (a learned vector after each feature row), `multi_image`
    ("base": an image of a sample with several images gets the base view only; "anyres": every image is
    tiled) and `anyres_max` (LLaVA-OneVision's cap, in base views' worth of tokens) refine it.
    `max_pixels` (and optionally `min_pixels`) turns on Qwen2-VL-style native resolution (`smart_resize`,
    sides multiples of patch x merge) for a tower whose position embeddings interpolate (hf_clip,
    hf_siglip); merge = the projector's `reduce_factor` with `reduce: pixel_shuffle` (Qwen2-VL: 2), else 1.
    A SigLIP2 NaFlex tower (backend hf_siglip2) always reads images natively (its `max_num_patches`).

The registry of backbone pairs (`PRESETS`) and `resolve_config` live in model/model.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
# The VLM's parts that always train, at the projector's rate: the projector, trainable token embedding rows
# and anyres's learned row separator (parameter name prefixes). One list for what trains (model/stages.py), its learning rate (trainer/optim.py)
# and what a trainable-only save keeps (model/checkpoint.py).
PROJECTOR_PREFIXES = ("projector.", "token_rows.", "image_newline")
TOWER_DTYPES = ("auto", "float32", "bfloat16")
MULTI_IMAGE = ("base", "anyres")


@dataclass
class VLMConfig:
    lm: str = "Qwen/Qwen2.5-0.5B-Instruct"  # hub id or local directory of the LM, or "scratch"
    lm_backend: str = "qwen"  # LM family: a key of model.model.LM_BACKBONES (qwen, hf)
    lm_config: dict | None = None  # the config of a scratch LM (QWenConfig fields, or transformers' + model_type)
    tokenizer: str | None = None  # None -> the LM's directory when it holds a tokenizer
    towers: list[dict] = field(default_factory=list)  # [{backend, name_or_path, feature_layer, select, ...}]
    image_mode: str = "pad"  # pad (to square, mean colour), resize or crop
    projector: str = "mlp2x_gelu"  # linear, mlpNx_gelu, identity (model/projector.py)
    reduce: str | None = None  # token reduction: pixel_shuffle or avg_pool (None = every token)
    reduce_factor: int = 1  # the reduction cuts tokens per image by reduce_factor**2
    dtype: str = "auto"  # bf16 base weights where the device has native bf16, else fp32 (model/dtypes.py)
    tower_dtype: str | None = None  # "auto" | "float32" | "bfloat16": frozen towers only (None = dtype)
    image_token_id: int | None = None  # the placeholder id (None = the tokenizer's, or <image> added)
    freeze_towers: bool = True  # towers built frozen (vision_lr > 0 trains them anyway)
    init_from: str | None = None  # a transformers Llava directory the whole model is imported from
    lora: dict | None = None  # the LoRA settings a run applied (informational; set by training)
    chat_template: str | None = None  # chatml, llama3, mistral, gemma, phi3 (None = picked from the tokenizer)
    trainable_tokens: list[str] | None = None  # tokens whose input rows train (None = the added ones)
    image_delimiters: bool = False  # add <image_start>/<image_end> for an LM without image start/end
    image_grid_pinpoints: list[list[int]] | None = None  # [[height, width], ...]: turns anyres on
    image_newline: bool = True  # anyres: a learned vector closes each feature row
    multi_image: str = "base"  # anyres: "base" = base view only when a sample has several images
    anyres_max: int | None = None  # anyres: shrink maps over this many base views' tokens (OneVision)
    min_pixels: int | None = None  # native: smart_resize's pixel floor (None = one merged token)
    max_pixels: int | None = None  # native: smart_resize's pixel cap; setting it turns native resolution on

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"VLMConfig.dtype={self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.tower_dtype not in (None, *TOWER_DTYPES):
            raise ValueError(f"VLMConfig.tower_dtype={self.tower_dtype!r}; valid: None, {', '.join(TOWER_DTYPES)}")
        if self.init_from is None and not self.towers:
            raise ValueError("VLMConfig.towers is empty: give at least one {backend, name_or_path} tower")
        for i, spec in enumerate(self.towers):
            if not isinstance(spec, dict) or "backend" not in spec or "name_or_path" not in spec:
                raise ValueError(f"VLMConfig.towers[{i}]={spec!r} needs the keys 'backend' and 'name_or_path'")
        self._check_resolution()

    def _check_resolution(self) -> None:
        pins = self.image_grid_pinpoints
        if pins is not None:
            ok = isinstance(pins, (list, tuple)) and len(pins) > 0 and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(type(v) is int and v > 0 for v in p)
                for p in pins)
            if not ok:
                raise ValueError(f"VLMConfig.image_grid_pinpoints={pins!r}; expected a non-empty list of "
                                 f"[height, width] pairs of positive ints, e.g. [[336, 672], [672, 336]]")
            self.image_grid_pinpoints = [[int(h), int(w)] for h, w in pins]
        if not isinstance(self.image_newline, bool):
            raise ValueError(f"VLMConfig.image_newline={self.image_newline!r}; expected true or false")
        if self.multi_image not in MULTI_IMAGE:
            raise ValueError(f"VLMConfig.multi_image={self.multi_image!r}; valid: {', '.join(MULTI_IMAGE)}")
        if self.anyres_max is not None and (type(self.anyres_max) is not int or self.anyres_max < 1):
            raise ValueError(f"VLMConfig.anyres_max={self.anyres_max!r}; expected a positive int or null")
        for key in ("min_pixels", "max_pixels"):
            v = getattr(self, key)
            if v is not None and (type(v) is not int or v < 1):
                raise ValueError(f"VLMConfig.{key}={v!r}; expected a positive int (pixels) or null")
        if self.min_pixels is not None and self.max_pixels is None:
            raise ValueError("VLMConfig.min_pixels is set without max_pixels; native resolution needs max_pixels")
        if self.min_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"VLMConfig.min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")
        if self.anyres and self.max_pixels is not None:
            raise ValueError("VLMConfig: image_grid_pinpoints (anyres) and max_pixels (native resolution) exclude "
                             "each other; set one")

    @property
    def anyres(self) -> bool:
        """True when the config turns LLaVA-NeXT anyres on (`image_grid_pinpoints` is set)."""
        return self.image_grid_pinpoints is not None

    @property
    def is_scratch_lm(self) -> bool:
        return self.lm == "scratch" or self.lm.startswith("scratch:")

    def scratch_lm_config(self) -> dict:
        """The LM config dict for a scratch LM: `lm_config` with the inline JSON merged over it."""
        assert self.is_scratch_lm, f"lm={self.lm!r} is not a scratch LM"
        cfg = dict(self.lm_config or {})
        if self.lm.startswith("scratch:"):
            try:
                cfg.update(json.loads(self.lm[len("scratch:"):]))
            except json.JSONDecodeError as e:
                raise ValueError(f"VLMConfig.lm={self.lm!r}: the part after 'scratch:' is not JSON: {e}") from e
        if not cfg:
            raise ValueError("VLMConfig: a scratch LM needs lm_config (or lm='scratch:{...json...}')")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    def to_json_string(self) -> str:
        """The config as JSON (what the Trainer's TensorBoard logger records at the start of a run)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"VLMConfig: unknown field(s) {unknown}; valid: {sorted(names)}")
        return cls(**copy.deepcopy(d))
