"""`VLMConfig` (what a VLM is built from) and `PRESETS`, the registry of backbone pairs.

Contract:
- `VLMConfig` is a plain dataclass, JSON-serialisable with `to_dict()` / `from_dict()`.
  - `lm`: a hub id or local directory, or `"scratch"` / `"scratch:<json>"` for a randomly initialised
    LM built from `lm_config` (the JSON after `scratch:` is merged over `lm_config`).
  - `lm_backend`: `"qwen"` (our `qwen.QWenLMHeadModel`) or `"hf"` (any transformers causal LM, fed
    through `inputs_embeds`). `lm_config` for a scratch LM is a `QWenConfig` dict (qwen) or a
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
- `PRESETS`: name -> VLMConfig kwargs. `resolve_config(name_or_config, **overrides)` turns a preset
  name, a dict or a VLMConfig into a VLMConfig; an unknown preset lists the valid ones.
  Swapping a backbone is one line here or one `key=value` override.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

LM_BACKENDS = ("qwen", "hf")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOWER_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class VLMConfig:
    lm: str = "Qwen/Qwen2.5-0.5B-Instruct"
    lm_backend: str = "qwen"
    lm_config: dict | None = None
    tokenizer: str | None = None  # None -> the LM's directory when it holds a tokenizer
    towers: list[dict] = field(default_factory=list)
    image_mode: str = "pad"
    projector: str = "mlp2x_gelu"
    reduce: str | None = None
    reduce_factor: int = 1
    dtype: str = "auto"  # bf16 base weights where the device has native bf16, else fp32 (model/dtypes.py)
    tower_dtype: str | None = None  # "auto" | "float32" | "bfloat16": frozen towers only (None = dtype)
    image_token_id: int | None = None
    freeze_towers: bool = True
    init_from: str | None = None
    lora: dict | None = None

    def __post_init__(self) -> None:
        if self.lm_backend not in LM_BACKENDS:
            raise ValueError(f"VLMConfig.lm_backend={self.lm_backend!r}; valid: {', '.join(LM_BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"VLMConfig.dtype={self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.tower_dtype not in (None, *TOWER_DTYPES):
            raise ValueError(f"VLMConfig.tower_dtype={self.tower_dtype!r}; valid: None, {', '.join(TOWER_DTYPES)}")
        if self.init_from is None and not self.towers:
            raise ValueError("VLMConfig.towers is empty: give at least one {backend, name_or_path} tower")
        for i, spec in enumerate(self.towers):
            if not isinstance(spec, dict) or "backend" not in spec or "name_or_path" not in spec:
                raise ValueError(f"VLMConfig.towers[{i}]={spec!r} needs the keys 'backend' and 'name_or_path'")

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"VLMConfig: unknown field(s) {unknown}; valid: {sorted(names)}")
        return cls(**copy.deepcopy(d))


def _tower(backend: str, name_or_path: str, feature_layer: int = -2, select: str = "patch", **kw: Any) -> dict:
    return {"backend": backend, "name_or_path": name_or_path, "feature_layer": feature_layer, "select": select, **kw}


# A tiny LM for the offline demo and tests: Qwen2 layout, a vocabulary that holds the Qwen-1 specials.
TINY_LM = {
    "arch": "qwen2", "vocab_size": 151936, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
    "max_position_embeddings": 2048, "image_token_id": 151646,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The original pair: Qwen-7B-Chat + SigLIP so400m/14 at 384 (729 patches, no CLS).
    "qwen7b-siglip": dict(
        lm="Qwen/Qwen-7B-Chat", lm_backend="qwen",
        towers=[_tower("hf_siglip", "google/siglip-so400m-patch14-384", feature_layer=-2)],
        image_mode="resize",
    ),
    "qwen1.8b-clip336": dict(
        lm="Qwen/Qwen-1_8B-Chat", lm_backend="qwen",
        towers=[_tower("hf_clip", "openai/clip-vit-large-patch14-336", feature_layer=-2)],
        image_mode="pad",
    ),
    "qwen2.5-0.5b-siglip": dict(
        lm="Qwen/Qwen2.5-0.5B-Instruct", lm_backend="qwen",
        towers=[_tower("hf_siglip", "google/siglip-so400m-patch14-384", feature_layer=-2)],
        image_mode="resize",
    ),
    # Offline: a tiny timm CNN tower (random init) and a tiny scratch LM. Point `tokenizer` at a
    # directory holding `qwen.tiktoken` (e.g. ../shared/data/qwen1) to chat with it.
    "tiny": dict(
        lm="scratch", lm_backend="qwen", lm_config=dict(TINY_LM), tokenizer=None,
        towers=[_tower("timm", "test_resnet", feature_layer=-1, pretrained=False)],  # 5x5 grid of 96 ch
        image_mode="resize", projector="mlp2x_gelu",
    ),
}


def resolve_config(preset_or_config: str | dict | VLMConfig, **overrides: Any) -> VLMConfig:
    """A preset name, a dict of VLMConfig fields or a VLMConfig -> VLMConfig (with overrides applied)."""
    if isinstance(preset_or_config, VLMConfig):
        base = preset_or_config.to_dict()
    elif isinstance(preset_or_config, dict):
        base = copy.deepcopy(preset_or_config)
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown VLM preset {preset_or_config!r}; valid: {', '.join(sorted(PRESETS))}")
        base = copy.deepcopy(PRESETS[preset_or_config])
    else:
        raise TypeError(f"expected a preset name, dict or VLMConfig, got {type(preset_or_config).__name__}")
    base.update(copy.deepcopy(overrides))
    return VLMConfig.from_dict(base)
