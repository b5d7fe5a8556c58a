"""Checkpoint I/O for `QWenLMHeadModel` in each arch's native on-disk layout.

Contract
--------
* `load_pretrained(cls, dir_or_hub_id, dtype=None, **config_overrides)`: reads `config.json` and the
  weights from `model.safetensors`, `model.safetensors.index.json` (shards), `pytorch_model.bin` or
  `pytorch_model.bin.index.json` (`.bin` read with `weights_only=True`). The model is built on the meta
  device and the loaded tensors are assigned in place (no second copy of the weights). `dtype=None`
  keeps the stored dtype. When config.json has no `image_token_id` and the released default does not
  fit the vocabulary, the placeholder of the checkpoint's own tokenizer is used.
* Names: Qwen-1 official names are ours (a Qwen-VL(-Chat) checkpoint's `transformer.visual.*` tensors are
  skipped: its vision side is visual/qwenvl.py's); Qwen2/Qwen3 transformers names are mapped (q/k/v_proj are
  concatenated into `c_attn`, gate_proj -> w2, up_proj -> w1, down_proj -> mlp.c_proj ...).
* A tensor that is unexpected, missing, or of the wrong shape raises one `ValueError` naming the file
  and the tensor (and the expected shape).
* `save_pretrained(model, dir, max_shard_bytes=None)` writes the arch's native names + native
  config.json (transformers can load the Qwen2/Qwen3 output; Qwen-1 output matches the published layout).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file

from .config import QWenConfig
from .tokenizer import HF_TOKENIZER_FILE, VOCAB_FILE, load_tokenizer

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
VISUAL_PREFIX = "transformer.visual."  # a Qwen-VL(-Chat) checkpoint's vision tensors (skipped here)
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# transformers (Qwen2/Qwen3) per-layer suffix -> ours. q/k/v are handled separately (fused into c_attn).
_HF_LAYER = {
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.w2.weight",
    "mlp.up_proj.weight": "mlp.w1.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
}
_HF_GLOBAL = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_QKV_RE = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")


def resolve_path(path: str | Path) -> Path:
    """A local directory, or a hub id downloaded with huggingface_hub (fails clearly when offline)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise NotADirectoryError(f"expected a checkpoint directory, got a file: {p}")
        return p
    if str(path).count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory not found: {p}")
    try:
        patterns = ["*.json", "*.safetensors", "*.tiktoken", "*.txt", "*.model"]
        return Path(snapshot_download(str(path), allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - re-raised with the id and the cause
        raise FileNotFoundError(f"{path!r} is not a local directory and could not be fetched from the hub "
                                f"({type(e).__name__}: {e})") from e


def _weight_files(d: Path) -> list[Path]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid index (needs a 'weight_map'): {e}") from e
            files = sorted({d / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{index}: shard {f.name} is listed but missing")
            return files
    for name in (SAFE, BIN):
        if (d / name).is_file():
            return [d / name]
    raise FileNotFoundError(f"no weights in {d}: expected {SAFE}, {SAFE_INDEX}, {BIN} or {BIN_INDEX}")


def _iter_tensors(file: Path):
    """Yield (name, tensor) one at a time (safetensors lazily; .bin via mmap + weights_only)."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        try:
            sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{file}: cannot be read with weights_only=True ({e})") from e
        yield from sd.items()


def load_state_dict_native(d: Path, config: QWenConfig, dtype: torch.dtype | None,
                           expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Read every weight file of `d` into OUR names, checking names and shapes against `expected`."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    pending_qkv: dict[int, dict[str, torch.Tensor]] = {}

    def put(ours: str, t: torch.Tensor, file: Path, native: str) -> None:
        if ours not in expected:
            raise ValueError(f"{file}: unexpected tensor {native!r} for config {config.arch} "
                             f"(num_hidden_layers={config.num_hidden_layers}, qk_norm={config.qk_norm}, "
                             f"qkv_bias={config.qkv_bias})")
        if t.shape != expected[ours]:
            raise ValueError(f"{file}: tensor {native!r} has shape {tuple(t.shape)}, the config "
                             f"expects {tuple(expected[ours])}")
        out[ours] = t if dtype is None else t.to(dtype)
        origin[ours] = file

    for file in _weight_files(d):
        for native, t in _iter_tensors(file):
            if config.arch == "qwen1":
                if native.startswith(VISUAL_PREFIX):
                    continue  # Qwen-VL(-Chat)'s vision side: read by visual/qwenvl.py, not the LM
                put(native, t, file, native)
                continue
            if native in _HF_GLOBAL:
                put(_HF_GLOBAL[native], t, file, native)
                continue
            m = _HF_LAYER_RE.match(native)
            if m is None:
                raise ValueError(f"{file}: unexpected tensor {native!r} for config {config.arch}")
            i, rest = int(m.group(1)), m.group(2)
            qkv = _QKV_RE.match(rest)
            if qkv is not None:
                parts = pending_qkv.setdefault(i, {})
                parts[f"{qkv.group(1)}.{qkv.group(2)}"] = t
                _flush_qkv(i, parts, put, file, config)
                continue
            if rest not in _HF_LAYER:
                raise ValueError(f"{file}: unexpected tensor {native!r} for config {config.arch}")
            put(f"transformer.h.{i}.{_HF_LAYER[rest]}", t, file, native)

    if config.tie_word_embeddings and "transformer.wte.weight" in out:
        out.pop("lm_head.weight", None)  # tied: the embedding is the head
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"{d}: missing tensor(s) {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                         f"(in our names) for config {config.arch} with {config.num_hidden_layers} layers")
    return out


def _flush_qkv(i: int, parts: dict[str, torch.Tensor], put, file: Path, config: QWenConfig) -> None:
    """Once q, k and v (weights and, if any, biases) of layer i are read, fuse them into c_attn."""
    for kind in ("weight", "bias"):
        keys = [f"{c}.{kind}" for c in "qkv"]
        if all(k in parts for k in keys):
            fused = torch.cat([parts.pop(k) for k in keys], dim=0)  # [(Hq + 2 Hkv) * D, ...]
            put(f"transformer.h.{i}.attn.c_attn.{kind}", fused, file, f"model.layers.{i}.self_attn.qkv.{kind}")


def load_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, **config_overrides):
    d = resolve_path(path)
    config = QWenConfig.from_pretrained(d, **config_overrides)
    if "image_token_id" not in config_overrides and config.image_token_id >= config.vocab_size:
        # The released vocabularies' placeholder id does not fit this (custom / tiny) vocabulary:
        # take the placeholder of the checkpoint's own tokenizer when it has one.
        config.image_token_id = _image_token_id_from_tokenizer(d, config.image_token_id)
    with torch.device("meta"):
        model = cls(config)  # no storage allocated; the loaded tensors are assigned below
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = load_state_dict_native(d, config, dtype, expected)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def _image_token_id_from_tokenizer(d: Path, default: int) -> int:
    if not ((d / VOCAB_FILE).is_file() or (d / HF_TOKENIZER_FILE).is_file()):
        return default
    return load_tokenizer(d).image_token_id


def to_native_state_dict(model) -> dict[str, torch.Tensor]:
    """Our names -> the arch's native names (contiguous, unshared tensors ready for safetensors)."""
    cfg: QWenConfig = model.config
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if cfg.arch == "qwen1":
        return {k: v.detach().contiguous() for k, v in sd.items()}
    inv_layer = {v: k for k, v in _HF_LAYER.items()}
    inv_global = {v: k for k, v in _HF_GLOBAL.items()}
    out = {}
    for name, t in sd.items():
        t = t.detach()
        if name in inv_global:
            out[inv_global[name]] = t.contiguous()
            continue
        m = re.match(r"^transformer\.h\.(\d+)\.(.+)$", name)
        assert m is not None, f"unmapped parameter {name}"
        i, rest = m.group(1), m.group(2)
        if rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = t.split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=0)
            for c, part in zip("qkv", (q, k, v)):
                out[f"model.layers.{i}.self_attn.{c}_proj.{kind}"] = part.clone().contiguous()
            continue
        out[f"model.layers.{i}.{inv_layer[rest]}"] = t.contiguous()
    return out


def save_pretrained(model, out_dir: str | Path, max_shard_bytes: int | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: QWenConfig = model.config
    native = to_native_state_dict(model)
    (out / "config.json").write_text(json.dumps(cfg.to_native_dict(), indent=2) + "\n")
    if max_shard_bytes is None:
        save_file(native, str(out / SAFE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in native.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for j, shard in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in native.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
