"""QLoRA training steps: 4-bit NF4 base weights (bitsandbytes), LoRA adapters training on top.

    python benchmarks/qlora_step.py --device cuda            # Qwen-1.8B's LM shape, bf16 compute
    python benchmarks/qlora_step.py --device cpu --quick     # a tiny LM (bitsandbytes' CPU backend)

The VLM is built from scratch (random weights: no download): the LM with Qwen-1.8B's shape (hidden 2048,
24 layers, 16 heads, MLP 5504 per branch, 151,936-row vocabulary) or, with `--quick`, the `tiny` preset's;
a tiny CNN tower (the tower plays no part in QLoRA). The LM's linear layers are quantised to NF4
(`model.quant.quantize_lm_4bit`, what `lora.qlora=true` does), LoRA (`--rank`) goes on the default
targets, and `--steps` AdamW steps run on random token batches with labels (`--batch-size` x `--seq-len`).

Output, one line: `qlora_step device=.. layers_4bit=.. base_4bit_mb=.. base_bf16_mb=.. ratio=..
trainable=.. step_s=.. tokens_per_s=.. peak_mem_mb=.. loss_first=.. loss_last=..` (`ratio` = 4-bit bytes
incl. quantisation state / the same weights in bf16; `step_s` = the median step after the first;
`peak_mem_mb`: CUDA max_memory_allocated, CPU the process's peak RSS). `main()` returns the figures.
Exit status 2 when the device is not there or bitsandbytes is missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never download anything
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from qwenvl_lab.model import build_vlm
from qwenvl_lab.model.model import TINY_LM
from qwenvl_lab.model.quant import base_weight_bytes
from qwenvl_lab.model.stages import apply_lora, set_trainable
from qwenvl_lab.model.train_config import LoraSettings

from benchmarks import common  # noqa: E402

# Qwen-1.8B's LM shape (Qwen-1 `intermediate_size` 11008 = two branches of 5504).
QWEN_1_8B = {"arch": "qwen2", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 24,
             "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5504,
             "max_position_embeddings": 8192, "image_token_id": 151646}
N_TEXT = 151643  # ids below <|endoftext|> are ordinary text in both LM shapes' vocabulary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda | cpu")
    ap.add_argument("--quick", action="store_true", help="the tiny preset's LM instead of Qwen-1.8B's shape")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    return ap.parse_args(argv)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return common.peak_rss_bytes() / 2**20


def build(args: argparse.Namespace, device: torch.device):

    lm_config = dict(TINY_LM) if args.quick else dict(QWEN_1_8B)
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # bf16 matmuls are slow on most CPUs
    with torch.device(device):  # weights are created where they will live
        vlm = build_vlm("tiny", lm_config=lm_config, dtype=dtype)
    apply_lora(vlm, LoraSettings(r=args.rank, alpha=2 * args.rank, dropout=0.0, qlora=True))
    set_trainable(vlm, "sft")
    return vlm.to(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("qlora_step: --device cuda but no CUDA device is available", file=sys.stderr)
        raise SystemExit(2)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("qlora_step: bitsandbytes is not installed (pip install -e '.[qlora]')", file=sys.stderr)
        raise SystemExit(2) from None

    torch.manual_seed(0)
    vlm = build(args, device).train()
    nbytes, numel = base_weight_bytes(vlm.lm)
    n4 = sum(1 for m in vlm.lm.modules() if type(m).__name__ == "Linear4bit" and hasattr(m.weight, "quant_state"))
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    # Ordinary text ids only (below Qwen's special tokens, so no image placeholder among them).
    ids = torch.randint(0, N_TEXT, (args.batch_size, args.seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []

    def step():
        loss = vlm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for _ in range(args.steps):
        times.append(common.timed(step, device))
    losses = [float(x) for x in losses]
    step_s = statistics.median(times[1:] or times)
    res = {
        "device": device.type, "layers_4bit": n4, "base_4bit_mb": nbytes / 2**20, "base_bf16_mb": 2 * numel / 2**20,
        "ratio": nbytes / (2 * numel), "trainable": sum(p.numel() for p in params), "step_s": step_s,
        "tokens_per_s": args.batch_size * args.seq_len / step_s, "peak_mem_mb": _peak_mem_mb(device),
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    print("qlora_step " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
          flush=True)
    return res


if __name__ == "__main__":
    main()
