"""Convert a Qwen-1 checkpoint to transformers' Qwen2 format.

Usage: `python -m qwenvl_lab.qwen.convert --src QWEN1_DIR --dst DIR [--dtype bfloat16] [--max-shard-gb 5]`

Contract
--------
* Weights: c_attn -> q/k/v_proj (weights and biases), attn.c_proj -> o_proj, w2 -> gate_proj,
  w1 -> up_proj, mlp.c_proj -> down_proj, ln_1/ln_2/ln_f -> input_layernorm/post_attention_layernorm/
  norm; intermediate_size / 2; kv heads = heads; rope_theta = rotary_emb_base.
* The result is exact (fp32 ~1e-7) for sequences up to the source's `seq_length`; written as
  `max_position_embeddings`. A source with `use_dynamic_ntk` / `use_logn_attn` behaves differently beyond
  that length, and the conversion warns.
* Tokenizer: `qwen.tiktoken` becomes a byte-level BPE `tokenizer.json` (merges recovered from the ranks)
  with Qwen-1's specials at the same ids, plus `tokenizer_config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import warnings
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .config import QWenConfig
from .modeling import QWenLMHeadModel
from .tokenizer import PAT_STR, QWEN1_SPECIALS, VOCAB_FILE, read_tiktoken_ranks

log = logging.getLogger(__name__)


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (GPT-2's table)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), 256)))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)  # non-printable bytes go to code points past 255, in order
            n += 1
    return table


def _last_merge(token: bytes, ranks: dict[bytes, int], limit: int) -> tuple[bytes, bytes]:
    """BPE-merge `token`'s bytes with ranks below `limit` until two parts remain (tiktoken's rule)."""
    parts = [bytes([b]) for b in token]
    inf = 1 << 62
    while len(parts) > 2:
        best_i, best_r = -1, inf
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], inf)
            if r < limit and r < best_r:
                best_i, best_r = i, r
        if best_i < 0:
            raise ValueError(f"token {token!r} (rank {limit}) cannot be built from lower-ranked tokens")
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def tiktoken_to_hf(ranks: dict[bytes, int], specials: list[str]):
    """A `tokenizers.Tokenizer` equivalent to tiktoken BPE with `ranks` + `specials` (ids n_ranks...)."""
    b2u = bytes_to_unicode()

    def u(bs: bytes) -> str:
        return "".join(b2u[b] for b in bs)

    vocab = {u(tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _last_merge(tok, ranks, r)
            merges.append((u(left), u(right)))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return tk


def convert_tokenizer(src, dst: str | Path) -> int:
    """Write tokenizer.json + tokenizer_config.json to `dst`; returns the <|endoftext|> id.

    `src`: a directory holding `qwen.tiktoken`, or a loaded `QWenTokenizer`."""
    vocab_file = getattr(src, "vocab_file", None) or Path(src) / VOCAB_FILE
    if not vocab_file.is_file():
        raise FileNotFoundError(f"Qwen-1 vocabulary file not found: {vocab_file}")
    ranks = read_tiktoken_ranks(vocab_file)
    tk = tiktoken_to_hf(ranks, list(QWEN1_SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    Path(dst).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(dst))
    return len(ranks)  # <|endoftext|> is the first special


def convert(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int | None = 5 * 1024**3) -> Path:
    src, dst = Path(src), Path(dst)
    cfg = QWenConfig.from_pretrained(src)
    if cfg.arch != "qwen1":
        raise ValueError(f"{src / 'config.json'}: field 'model_type' is not 'qwen' (a Qwen-1 checkpoint)")
    if cfg.use_dynamic_ntk or cfg.use_logn_attn:
        warnings.warn(
            f"{src}: the source uses dynamic NTK / logN attention beyond seq_length={cfg.seq_length}; the "
            f"converted Qwen2 model matches it only up to {cfg.seq_length} tokens", stacklevel=2)
    model = QWenLMHeadModel.from_pretrained(src, dtype=dtype)
    model.config = dataclasses.replace(
        cfg, arch="qwen2", use_dynamic_ntk=False, use_logn_attn=False,
        max_position_embeddings=cfg.seq_length,  # the range where the conversion is exact
    )
    dst.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(dst, max_shard_bytes=max_shard_bytes if max_shard_bytes and total > max_shard_bytes
                          else None)
    stored = next(model.parameters()).dtype
    cfg_path = dst / "config.json"
    native = json.loads(cfg_path.read_text())
    native["dtype"] = str(stored).removeprefix("torch.")
    native["bos_token_id"] = None
    native["eos_token_id"] = convert_tokenizer(src, dst)
    cfg_path.write_text(json.dumps(native, indent=2) + "\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="Qwen-1 checkpoint directory")
    ap.add_argument("--dst", required=True, help="output directory (transformers Qwen2 format)")
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16, float32 (default: keep stored dtype)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    args = ap.parse_args(argv)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    out = convert(args.src, args.dst, dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
