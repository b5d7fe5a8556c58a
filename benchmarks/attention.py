"""Time and peak memory of each attention implementation over a sweep of sequence lengths.

    python benchmarks/attention.py                       # CPU: torch + eager; GPU kernels skipped
    python benchmarks/attention.py --dtype fp16 --backward --seqlens 512 1024 2048 4096   # on a GPU

Each cell is the median wall time of `--iters` calls (forward, or forward + backward with
`--backward`) after `--warmup` calls, and the peak memory the call added on top of its inputs
(CUDA: the caching allocator's peak; CPU: the profiler's allocation trace). Implementations that
cannot run on this device (`triton`/`cuda` without a GPU, a failed build) are skipped with a message.
Prints one table; `--csv` also writes it as CSV.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the CPU profiler quiet; set before torch loads

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from qwenvl_lab.kernels import cuda_ext
from qwenvl_lab.kernels.attention import attention  # noqa: E402
from torch.profiler import ProfilerActivity, profile

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _skip_reason(impl: str, device: torch.device) -> str | None:
    if impl in ("triton", "cuda") and device.type != "cuda":
        return f"{impl}: skipped, needs a CUDA GPU (running on {device})"
    if impl == "cuda":
        try:
            cuda_ext.load()
        except cuda_ext.CudaExtensionError as e:
            return f"cuda: skipped, the extension did not build: {str(e).splitlines()[0]}"
    if impl == "triton":
        try:
            import qwenvl_lab.kernels.triton_attention  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"triton: skipped, import failed: {e}"
    return None


def _cpu_peak_bytes(fn) -> int:
    """Peak of the running sum of allocations minus frees seen by the profiler while fn runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def _measure(fn, device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """(median ms, peak MB) of fn()."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _cpu_peak_bytes(fn)
    return statistics.median(times), peak / 2**20


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    rows = []
    skipped = {}
    for impl in args.impls:
        reason = _skip_reason(impl, device)
        if reason:
            skipped[impl] = reason
            print(reason)
    for t in args.seqlens:
        shape_q = (args.batch, args.heads, t, args.head_dim)
        shape_kv = (args.batch, args.kv_heads or args.heads, t, args.head_dim)
        q = torch.randn(shape_q, device=device, dtype=dtype, requires_grad=args.backward)
        k = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=args.backward)
        v = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=args.backward)
        grad = torch.randn(shape_q, device=device, dtype=dtype)
        for impl in args.impls:
            if impl in skipped:
                continue

            def call(impl=impl, q=q, k=k, v=v, grad=grad):
                out = attention(q, k, v, causal=args.causal, impl=impl)
                if args.backward:
                    torch.autograd.grad(out, (q, k, v), grad)

            try:
                ms, mb = _measure(call, device, args.warmup, args.iters)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. eager running out of memory
                print(f"{impl} at T={t}: failed: {str(e).splitlines()[0]}")
                ms = mb = math.nan
            flops = 4 * args.batch * args.heads * t * t * args.head_dim * (0.5 if args.causal else 1.0)
            flops *= 3.5 if args.backward else 1.0  # backward ~ 2.5x the forward's matmuls
            rows.append(dict(seqlen=t, impl=impl, ms=ms, peak_mb=mb, tflops=flops / (ms * 1e-3) / 1e12))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'seqlen':>7} {'impl':>7} {'ms':>10} {'peak MB':>10} {'TFLOP/s':>9}")
    for r in rows:
        print(f"{r['seqlen']:>7} {r['impl']:>7} {r['ms']:>10.3f} {r['peak_mb']:>10.2f} {r['tflops']:>9.4f}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", nargs="+", default=["torch", "eager", "triton", "cuda"],
                   choices=["torch", "eager", "triton", "cuda"])
    p.add_argument("--seqlens", nargs="+", type=int, default=[128, 256, 512, 1024])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: kv heads (default = heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args(argv)
    rows = run(args)
    print_table(rows)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["seqlen", "impl"])
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
