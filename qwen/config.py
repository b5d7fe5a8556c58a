"""`QWenConfig`: one dataclass for Qwen-1, Qwen2/2.5 and Qwen3 dense models.

Contract
--------
* `intermediate_size` is the width of ONE MLP branch (Qwen-1's config value / 2).
* `QWenConfig.from_pretrained(dir, **overrides)` reads a Qwen-1 (`model_type: qwen`) or a transformers
  Qwen2/Qwen3 `config.json`; unknown keys, missing required keys and unsupported settings raise one
  `ValueError` naming the file and the field.
* `to_dict()` is our own flat form; `to_native_dict()` is the arch's published config.json
  (Qwen-1's exact keys for `qwen1`, transformers' keys for `qwen2` / `qwen3`).
* `image_token_id`: the id whose embedding rows `QWenModel` replaces with image features. Read from
  config.json when present, otherwise the released vocabularies' placeholder (`<|extra_0|>` = 151646
  for Qwen-1, `<|image_pad|>` = 151655 for Qwen2/3); callers with another vocabulary set it from
  `tokenizer.image_token_id`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = ("qwen1", "qwen2", "qwen3")
DEFAULT_IMAGE_TOKEN_ID = {"qwen1": 151646, "qwen2": 151655, "qwen3": 151655}

# Every key of the published Qwen-1 config.json (plus the ones later Qwen-1 releases / re-saves add).
QWEN1_REQUIRED = (
    "hidden_size", "intermediate_size", "kv_channels", "layer_norm_epsilon", "max_position_embeddings",
    "num_attention_heads", "num_hidden_layers", "rotary_emb_base", "seq_length", "vocab_size",
)
QWEN1_KNOWN = set(QWEN1_REQUIRED) | {
    "architectures", "auto_map", "attn_dropout_prob", "bf16", "emb_dropout_prob", "fp16", "fp32",
    "initializer_range", "model_type", "no_bias", "onnx_safe", "rotary_pct", "scale_attn_weights",
    "tie_word_embeddings", "tokenizer_class", "transformers_version", "use_cache", "use_dynamic_ntk",
    "use_flash_attn", "use_logn_attn", "softmax_in_fp32", "use_cache_quantization", "use_cache_kernel",
    "_name_or_path", "torch_dtype", "dtype", "image_token_id",
    "visual", "tokenizer_type",  # Qwen-VL(-Chat): its vision side is read by visual/qwenvl.py
}
HF_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
HF_KNOWN = set(HF_REQUIRED) | {
    "_name_or_path", "architectures", "attention_dropout", "bos_token_id", "chunk_size_feed_forward", "dtype",
    "eos_token_id", "hidden_act", "id2label", "initializer_range", "is_encoder_decoder", "label2id",
    "layer_types", "max_position_embeddings", "max_window_layers", "model_type", "num_key_value_heads",
    "output_attentions", "output_hidden_states", "pad_token_id", "problem_type", "return_dict",
    "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "sliding_window", "tie_word_embeddings",
    "transformers_version", "use_cache", "use_sliding_window", "torch_dtype", "attention_bias", "head_dim",
    "image_token_id", "tokenizer_class", "quantization_config_ignored",
}


@dataclass
class QWenConfig:
    arch: str = "qwen1"
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    intermediate_size: int = 11008  # ONE branch (Qwen-1 config value / 2)
    max_position_embeddings: int = 32768
    seq_length: int = 8192  # Qwen-1 NTK / logN threshold
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    image_token_id: int | None = None  # None -> DEFAULT_IMAGE_TOKEN_ID[arch]
    attn_impl: str = "auto"
    # RMSNorm / rotary / SwiGLU: kernels.fused impls (auto | torch | triton | compile); torch until the
    # fused kernels are measured on a GPU (docs/benchmarks.md), opt-in with `fused_impl=...`.
    fused_impl: str = "torch"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"QWenConfig.arch={self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"QWenConfig: hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.image_token_id is None:
            self.image_token_id = DEFAULT_IMAGE_TOKEN_ID[self.arch]
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"QWenConfig: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"QWenConfig.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.arch == "qwen1" and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError("QWenConfig: Qwen-1 has no GQA (num_key_value_heads must equal num_attention_heads)")
        if self.arch == "qwen2" and not self.qkv_bias:
            raise ValueError("QWenConfig: Qwen2 always has q/k/v biases (qkv_bias must be True)")

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QWenConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"QWenConfig: unknown fields {unknown}")
        return cls(**d)

    # ---- native config.json <-> QWenConfig ----
    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> QWenConfig:
        """Read `path/config.json` (or `path` itself when it is a file)."""
        p = Path(path)
        file = p if p.is_file() else p / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"config file not found: {file}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{file}: expected a JSON object")
        cfg = cls.from_native_dict(raw, source=str(file))
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"QWenConfig.from_pretrained: unknown override {k!r}")
            setattr(cfg, k, v)
        return cfg

    @classmethod
    def from_native_dict(cls, raw: dict[str, Any], source: str = "config.json") -> QWenConfig:
        mtype = raw.get("model_type")
        if mtype == "qwen":
            return cls._from_qwen1(raw, source)
        if mtype in ("qwen2", "qwen3"):
            return cls._from_hf(raw, source, mtype)
        raise ValueError(f"{source}: field 'model_type'={mtype!r} is not one of 'qwen', 'qwen2', 'qwen3'")

    @classmethod
    def _from_qwen1(cls, raw: dict[str, Any], source: str) -> QWenConfig:
        _check_keys(raw, QWEN1_REQUIRED, QWEN1_KNOWN, source)
        if raw.get("rotary_pct", 1.0) != 1.0:
            raise ValueError(f"{source}: field 'rotary_pct'={raw['rotary_pct']} is not supported (only 1.0)")
        if raw.get("no_bias", True) is not True:
            raise ValueError(f"{source}: field 'no_bias'=false is not supported (Qwen-1 checkpoints use true)")
        if raw.get("scale_attn_weights", True) is not True:
            raise ValueError(f"{source}: field 'scale_attn_weights'=false is not supported")
        if raw["intermediate_size"] % 2:
            raise ValueError(f"{source}: field 'intermediate_size'={raw['intermediate_size']} must be even "
                             "(it holds both MLP branches)")
        heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        if raw["kv_channels"] * heads != hidden:
            raise ValueError(f"{source}: field 'kv_channels'={raw['kv_channels']} * num_attention_heads="
                             f"{heads} != hidden_size={hidden}")
        return cls(
            arch="qwen1", vocab_size=raw["vocab_size"], hidden_size=hidden,
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=heads, head_dim=raw["kv_channels"],
            intermediate_size=raw["intermediate_size"] // 2,
            max_position_embeddings=raw["max_position_embeddings"], seq_length=raw["seq_length"],
            rope_theta=float(raw["rotary_emb_base"]), rms_norm_eps=raw["layer_norm_epsilon"],
            qkv_bias=True, qk_norm=False, tie_word_embeddings=raw.get("tie_word_embeddings", False),
            use_dynamic_ntk=raw.get("use_dynamic_ntk", False), use_logn_attn=raw.get("use_logn_attn", False),
            image_token_id=raw.get("image_token_id"),
            initializer_range=raw.get("initializer_range", 0.02),
        )

    @classmethod
    def _from_hf(cls, raw: dict[str, Any], source: str, mtype: str) -> QWenConfig:
        _check_keys(raw, HF_REQUIRED, HF_KNOWN, source)
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: field 'hidden_act'={raw['hidden_act']!r} is not supported (only silu)")
        if raw.get("use_sliding_window", False):
            raise ValueError(f"{source}: field 'use_sliding_window'=true is not supported")
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"{source}: field 'rope_parameters.rope_type'={rope_type!r} is not supported")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        if mtype == "qwen3" and raw.get("attention_bias", False):
            raise ValueError(f"{source}: field 'attention_bias'=true is not supported for qwen3")
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") if mtype == "qwen3" else None
        max_pos = raw.get("max_position_embeddings", 32768)
        return cls(
            arch=mtype, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
            intermediate_size=raw["intermediate_size"], max_position_embeddings=max_pos, seq_length=max_pos,
            rope_theta=float(theta), rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            qkv_bias=(mtype == "qwen2"), qk_norm=(mtype == "qwen3"),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            use_dynamic_ntk=False, use_logn_attn=False, image_token_id=raw.get("image_token_id"),
            initializer_range=raw.get("initializer_range", 0.02),
        )

    def to_native_dict(self) -> dict[str, Any]:
        """The arch's own config.json (what the released checkpoints / transformers read)."""
        if self.arch == "qwen1":
            return {
                "architectures": ["QWenLMHeadModel"],
                "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                             "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
                "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False,
                "fp32": False, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size * 2,
                "initializer_range": self.initializer_range, "kv_channels": self.head_dim,
                "layer_norm_epsilon": self.rms_norm_eps,
                "max_position_embeddings": self.max_position_embeddings, "model_type": "qwen",
                "no_bias": True, "num_attention_heads": self.num_attention_heads,
                "num_hidden_layers": self.num_hidden_layers, "onnx_safe": None,
                "rotary_emb_base": _int_if_whole(self.rope_theta), "rotary_pct": 1.0,
                "scale_attn_weights": True, "seq_length": self.seq_length,
                "tie_word_embeddings": self.tie_word_embeddings, "tokenizer_class": "QWenTokenizer",
                "transformers_version": "4.32.0", "use_cache": True,
                "use_dynamic_ntk": self.use_dynamic_ntk, "use_flash_attn": "auto",
                "use_logn_attn": self.use_logn_attn, "vocab_size": self.vocab_size,
            }
        d = {
            "architectures": ["Qwen2ForCausalLM" if self.arch == "qwen2" else "Qwen3ForCausalLM"],
            "model_type": self.arch, "hidden_act": "silu", "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings, "vocab_size": self.vocab_size,
            "use_sliding_window": False, "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
        }
        if self.image_token_id < self.vocab_size:  # an out-of-vocabulary id would upset transformers
            d["image_token_id"] = self.image_token_id
        if self.arch == "qwen3":
            d["head_dim"] = self.head_dim
            d["attention_bias"] = False
        return d


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _check_keys(raw: dict[str, Any], required, known: set[str], source: str) -> None:
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for model_type={raw.get('model_type')!r}")
