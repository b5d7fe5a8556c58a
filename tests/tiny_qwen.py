"""Tiny Qwen vocabularies, configs and checkpoints for tests (built locally, no downloads).

* `write_tiny_vocab(dir) -> Path`: a `qwen.tiktoken` in the real format (256 single-byte ranks + a few
  dozen merges); Qwen-1 specials follow at n_ranks, n_ranks+1, ... (see `qwen.tokenizer`).
* `write_tiny_hf_tokenizer(dir, with_vl_tokens=True) -> Path`: a byte-level BPE `tokenizer.json` with
  Qwen2's special tokens, saved through transformers.
* `tiny_qwen_config(arch="qwen1", **overrides) -> QWenConfig`: hidden 64, 2 layers, 4 heads, vocab 512.
* `write_tiny_qwen_checkpoint(dir, arch="qwen1", **overrides) -> Path`: a random tiny model in that arch's
  native on-disk format (Qwen-1 official names + config.json keys; transformers' Qwen2/Qwen3 format
  written by transformers itself) plus its tokenizer files.
"""

from __future__ import annotations

import base64
from pathlib import Path

import torch
from qwenvl_lab.qwen.config import QWenConfig

# Common English pairs/words; each is reachable by merging two lower-ranked tokens.
TINY_MERGES = [
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ou", "is", "it", "es", "or", "ed",
    "ll", "st", "to", "ar", " t", " a", " s", " w", " o", " i", " h", " b", " c", " m",
    "the", " th", " the", "ing", "and", " an", " and", "ion", " is", " in", "\n\n", "  ",
]
TINY_VOCAB_SIZE = 512
QWEN2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN2_VL = {"<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"}


def _tiny_ranks() -> dict[bytes, int]:
    ranks = {bytes([i]): i for i in range(256)}
    for m in TINY_MERGES:
        ranks[m.encode("utf-8")] = len(ranks)
    return ranks


def tiny_n_ranks() -> int:
    return len(_tiny_ranks())


def write_tiny_vocab(out_dir: str | Path) -> Path:
    """Write `out_dir/qwen.tiktoken` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "qwen.tiktoken"
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in _tiny_ranks().items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tiny_hf_tokenizer(out_dir: str | Path, with_vl_tokens: bool = True) -> Path:
    """A Qwen2-style byte-level BPE tokenizer (the tiny ranks + Qwen2 specials) saved with save_pretrained."""
    from qwenvl_lab.qwen.convert import tiktoken_to_hf
    from transformers import PreTrainedTokenizerFast

    specials = [s for s in QWEN2_SPECIALS if with_vl_tokens or s not in QWEN2_VL]
    fast = PreTrainedTokenizerFast(tokenizer_object=tiktoken_to_hf(_tiny_ranks(), specials),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out / "tokenizer.json"


def tiny_qwen_config(arch: str = "qwen1", **overrides) -> QWenConfig:
    """A tiny config whose vocabulary fits the tiny tokenizers; image_token_id = their placeholder."""
    n = tiny_n_ranks()
    kw = dict(
        arch=arch, vocab_size=TINY_VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=256, seq_length=256, rope_theta=10000.0,
        rms_norm_eps=1e-6, qkv_bias=arch != "qwen3", qk_norm=arch == "qwen3", tie_word_embeddings=False,
        attn_impl="eager",
    )
    if arch == "qwen1":
        kw["image_token_id"] = n + 3  # <|extra_0|>
    else:
        kw["num_key_value_heads"] = 2
        kw["image_token_id"] = n + QWEN2_SPECIALS.index("<|image_pad|>")
        if arch == "qwen3":
            kw["head_dim"] = 32  # Qwen3 decouples head_dim from hidden/heads
    kw.update(overrides)
    return QWenConfig(**kw)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (norm weights too, so a swapped/missed tensor shows up)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1 and ("norm" in name or "ln_" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def write_tiny_qwen_checkpoint(out_dir: str | Path, arch: str = "qwen1", seed: int = 0, **overrides) -> Path:
    """Save a random tiny model in `arch`'s native layout (+ tokenizer files) and return the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_qwen_config(arch, **overrides)
    if arch == "qwen1":
        from qwenvl_lab.qwen.modeling import QWenLMHeadModel

        model = QWenLMHeadModel(cfg)
        _randomize(model, seed)
        model.save_pretrained(out)  # official Qwen-1 names and config keys
        write_tiny_vocab(out)
        return out
    model = build_hf_reference(cfg, seed)
    model.save_pretrained(str(out))
    write_tiny_hf_tokenizer(out)
    return out


def build_hf_reference(cfg: QWenConfig, seed: int = 0):
    """transformers' Qwen2ForCausalLM / Qwen3ForCausalLM with the same shapes as `cfg`, random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        use_sliding_window=False, attn_implementation="eager", image_token_id=cfg.image_token_id,
    )
    if cfg.arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=cfg.head_dim, attention_bias=False, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    _randomize(model, seed)
    return model.eval()
