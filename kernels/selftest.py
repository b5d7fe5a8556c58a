"""Self-test and micro-benchmark of the custom attention kernels on one device, and what `auto` picks.

    python -m qwenvl_lab.kernels.selftest [--device cuda] [--dtype bf16] [--head-dim 128] [--no-build]

Contract:
- `verify(device, dtype, head_dim, build=False) -> Choice`: for each candidate kernel — `triton`
  (kernels/triton_attention.py), `cuda` (the CUDA C++ extension; under `build=False` only when it is
  already built in this process or in its build cache, so a training step never waits for a
  multi-minute compile) and `torch_varlen` (torch's flash varlen kernel, packed batches only) — runs
  forward AND backward against an fp32 reference on small random inputs (causal and not, GQA, a KV-cache
  chunk, key-padding masks with fully masked rows, varlen packs), then, when it passed, times
  forward + backward against torch SDPA at a representative shape (`BENCH`). `Choice.impl` is the
  fastest kernel that passed and beats SDPA by more than 5%, else `torch` (SDPA); `Choice.varlen` is the
  path packed batches take (the chosen kernel's varlen when it passed, else `torch_varlen` when it passed
  and beats the per-sequence SDPA loop, else that loop); `Choice.reason` says why. Results are cached per
  (device, dtype, head_dim) for the process: `kernels.attention`'s `auto` reads them.
- Errors are max |kernel - reference| / max(1, max |reference|) over the output and dq, dk, dv;
  tolerances per dtype in `TOLERANCE`. A kernel that raises fails with the exception as its reason.
- The command line prints per kernel: available, pass/fail, max errors per case, timings, speedup, and
  the choice `auto` makes (SDPA, saying why, when a kernel failed). Exit status: 0 when every available
  kernel passed, 1 when one failed its numerics (auto then keeps SDPA or another kernel that passed), 2
  without a CUDA device. `--device cpu` runs the same check on the CPU where Triton interprets
  (`TRITON_INTERPRET=1` set before it is imported): small cases, no timing — the GPU check's `--dry-run`.
- `QWENVL_SELFTEST_BREAK=<kernel>` plants a fault (that kernel's output is scaled by 1.01) so a harness
  can prove it notices a broken kernel; never set it otherwise.
"""

from __future__ import annotations

if not (__package__ or "").startswith("qwenvl_lab."):  # the old spelling: `python -m kernels.selftest`
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse("kernels")

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import attention as A
from . import cuda_ext

TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPEEDUP_NEEDED = 1.05
# (name, batch, q heads, kv heads, q len, k len, causal, key-padding mask); varlen packs below.
CASES = [
    ("causal_gqa", 2, 4, 2, 77, 77, True, False),
    ("full_mha", 1, 2, 2, 33, 33, False, False),
    ("kv_cache_chunk", 2, 4, 4, 16, 40, True, False),
    ("padding_mask", 2, 4, 2, 50, 50, True, True),
]
VARLEN = ("varlen_causal", 4, 2, [13, 64, 1, 30])
DRY_CASES = [("causal_gqa", 1, 2, 1, 9, 9, True, False), ("padding_mask", 2, 2, 2, 8, 8, True, True)]
DRY_VARLEN = ("varlen_causal", 2, 1, [3, 7, 1])
BENCH = dict(batch=4, heads=16, kv_heads=16, seq=1024)  # fwd + bwd, causal


@dataclass
class KernelResult:
    name: str
    available: bool
    reason: str = ""
    passed: bool = False
    errors: dict[str, float] = field(default_factory=dict)
    ms: float | None = None
    ref_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        return None if not self.ms or not self.ref_ms else self.ref_ms / self.ms


@dataclass
class Choice:
    impl: str  # torch | triton | cuda
    varlen: str  # torch (per-sequence SDPA) | triton | cuda | torch_varlen
    reason: str
    results: list[KernelResult] = field(default_factory=list)


# The choices, by (device, dtype, head dim): the dispatcher's own table, which `auto` reads.
_CHOICES: dict[tuple[str, str, int], Choice] = A.VERIFIED  # type: ignore[assignment]


# ----- candidates ---------------------------------------------------------------------------------------
def _triton():
    tri = A._load_triton()
    return (lambda q, k, v, causal, mask: tri.triton_attention(q, k, v, causal=causal, attention_mask=mask),
            lambda q, k, v, cu, causal: tri.triton_varlen_attention(q, k, v, cu, causal=causal), True)


def _cuda(build: bool):
    if not build and not (cuda_ext.is_built() or cuda_ext.prebuilt()):
        raise RuntimeError("the CUDA extension is not built (python -m qwenvl_lab.kernels.selftest builds it once; auto "
                           "never waits for a build)")
    fn = A._load_cuda().cuda_attention

    def padded(q, k, v, causal, mask):
        return fn(q, k, v, causal=causal)

    return padded, lambda q, k, v, cu, causal: A._varlen_to_padded(fn, q, k, v, cu, causal, None), False


def _torch_varlen():
    A._load_torch_varlen()  # raises on a torch without the varlen kernel
    return None, A.torch_varlen_attention, False


BREAK_ENV = "QWENVL_SELFTEST_BREAK"  # a planted fault for harness tests: "<kernel name>"


def _broken(loader: Callable) -> Callable:
    """The loader's kernels with every output scaled by 1.01: wrong numbers, right shapes."""
    def load():
        padded, varlen, masks = loader()
        wrap = lambda fn: None if fn is None else (lambda *a, **kw: fn(*a, **kw) * 1.01)  # noqa: E731
        return wrap(padded), wrap(varlen), masks
    return load


def candidates(build: bool, device: torch.device | None = None) -> dict[str, Callable]:
    """name -> loader returning (padded fn or None, varlen fn, takes masks); a loader raises when unavailable.
    torch's flash varlen kernel is a GPU kernel: it is not a candidate on a CPU."""
    found = {"triton": _triton, "cuda": lambda: _cuda(build), "torch_varlen": _torch_varlen}
    if device is not None and device.type != "cuda":
        found.pop("torch_varlen")
    broken = os.environ.get(BREAK_ENV, "")
    if broken in found:
        found[broken] = _broken(found[broken])
    return found


# ----- checking -----------------------------------------------------------------------------------------
def _inputs(shape_q, shape_kv, device, dtype, g):
    mk = lambda s: torch.randn(*s, generator=g, device=device).to(dtype).requires_grad_()  # noqa: E731
    return mk(shape_q), mk(shape_kv), mk(shape_kv)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def _compare(run, ref, q, k, v, g) -> float:
    """Max normalised error of the output and the three input gradients."""
    out = run(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = ref(q32, k32, v32)
    want_grads = torch.autograd.grad(want, (q32, k32, v32), g.float())
    return max(_err(a, b) for a, b in zip((out, *grads), (want, *want_grads)))


def check(padded, varlen, takes_masks: bool, device: torch.device, dtype: torch.dtype, head_dim: int,
          cases=None, varlen_case=None) -> tuple[bool, dict[str, float], str]:
    """Forward and backward of a kernel against the fp32 reference on every case it supports."""
    _varlen_to_padded, eager_attention = A._varlen_to_padded, A.eager_attention
    cases = CASES if cases is None else cases
    varlen_case = VARLEN if varlen_case is None else varlen_case
    g = torch.Generator(device=device).manual_seed(0)  # private: the run's RNG streams stay untouched
    errors: dict[str, float] = {}
    tol = TOLERANCE[dtype]
    try:
        if padded is not None:
            for name, b, hq, hkv, tq, tk, causal, masked in cases:
                if masked and not takes_masks:
                    continue
                q, k, v = _inputs((b, hq, tq, head_dim), (b, hkv, tk, head_dim), device, dtype, g)
                mask = None
                if masked:  # left padding: sample 1 loses its first keys; its first query row sees nothing
                    mask = torch.ones(b, 1, tq, tk, dtype=torch.bool, device=device)
                    mask[1, :, :, : tk // 3] = False
                grad = torch.randn(b, hq, tq, head_dim, generator=g, device=device)
                errors[name] = _compare(lambda q_, k_, v_, c=causal, m=mask: padded(q_, k_, v_, c, m),
                                        lambda q_, k_, v_, c=causal, m=mask: eager_attention(
                                            q_, k_, v_, causal=c, attention_mask=m), q, k, v, grad)
        if varlen is not None:
            name, hq, hkv, lens = varlen_case
            total = sum(lens)
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
            q, k, v = _inputs((total, hq, head_dim), (total, hkv, head_dim), device, dtype, g)
            grad = torch.randn(total, hq, head_dim, generator=g, device=device)
            errors[name] = _compare(lambda q_, k_, v_: varlen(q_, k_, v_, cu, True),
                                    lambda q_, k_, v_: _varlen_to_padded(eager_attention, q_, k_, v_, cu, True, None),
                                    q, k, v, grad)
    except Exception as e:  # noqa: BLE001 - a kernel that raises has failed its self-test
        first = str(e).splitlines()[0] if str(e) else ""
        return False, errors, f"raised {type(e).__name__}: {first}"
    bad = {k: v for k, v in errors.items() if not math.isfinite(v) or v > tol}
    if bad:
        return False, errors, f"errors above {tol:g}: " + ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
    return True, errors, f"max error {max(errors.values(), default=0.0):.2e} <= {tol:g}"


def _time(fn, device: torch.device, reps: int = 5) -> float:
    """Median milliseconds of `fn()` (forward + backward) after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def bench(padded, varlen, device: torch.device, dtype: torch.dtype, head_dim: int, shape=None) -> tuple[float, float]:
    """(kernel ms, SDPA ms) of causal forward + backward at `shape` (padded; varlen-only kernels are timed
    on the same tokens cut into 4 packed sequences, against the per-sequence SDPA loop)."""
    _varlen_to_padded, sdpa_attention = A._varlen_to_padded, A.sdpa_attention
    s = dict(BENCH, **(shape or {}))
    g = torch.Generator(device=device).manual_seed(1)
    if padded is not None:
        q, k, v = _inputs((s["batch"], s["heads"], s["seq"], head_dim), (s["batch"], s["kv_heads"], s["seq"], head_dim),
                          device, dtype, g)
        step = lambda f: lambda: f(q, k, v).sum().backward()  # noqa: E731
        return (_time(step(lambda a, b_, c: padded(a, b_, c, True, None)), device),
                _time(step(lambda a, b_, c: sdpa_attention(a, b_, c, causal=True)), device))
    total = s["batch"] * s["seq"]
    cu = torch.arange(0, total + 1, s["seq"], dtype=torch.int32, device=device)
    q, k, v = _inputs((total, s["heads"], head_dim), (total, s["kv_heads"], head_dim), device, dtype, g)
    step = lambda f: lambda: f(q, k, v).sum().backward()  # noqa: E731
    return (_time(step(lambda a, b_, c: varlen(a, b_, c, cu, True)), device),
            _time(step(lambda a, b_, c: _varlen_to_padded(sdpa_attention, a, b_, c, cu, True, None)), device))


# ----- the decision -------------------------------------------------------------------------------------
def decide(results: list[KernelResult]) -> Choice:
    """The choice `auto` makes from per-kernel results (pure: tests drive it with made-up results)."""
    ok = {r.name: r for r in results if r.available and r.passed}
    fast = [r for r in ok.values() if r.name != "torch_varlen" and r.speedup and r.speedup > SPEEDUP_NEEDED]
    if fast:
        best = max(fast, key=lambda r: r.speedup)
        impl, reason = best.name, f"{best.name} passed its self-test and is {best.speedup:.2f}x SDPA"
    else:
        impl = "torch"
        def why_not(r: KernelResult) -> str:
            if not (r.available and r.passed):
                return r.reason
            return f"passed but {r.speedup:.2f}x SDPA" if r.speedup else "passed (not timed)"

        why = [f"{r.name}: {why_not(r)}" for r in results if r.name != "torch_varlen"]
        reason = "SDPA (" + ("; ".join(why) or "no custom kernel") + ")"
    if impl != "torch":
        varlen = impl
    elif "torch_varlen" in ok and (ok["torch_varlen"].speedup or 0) > SPEEDUP_NEEDED:
        varlen = "torch_varlen"
    else:
        varlen = "torch"
    return Choice(impl, varlen, reason, results)


def verify(device: torch.device | str, dtype: torch.dtype, head_dim: int, build: bool = False,
           cases=None, bench_shape: dict | None | bool = None, varlen_case=None) -> Choice:
    """Self-test and time every candidate once per (device, dtype, head_dim) in this process."""
    device = torch.device(device)
    key = A.verified_key(device, dtype, head_dim)
    device = torch.device(key[0])
    if key in _CHOICES:
        return _CHOICES[key]
    results = []
    # Fresh tensors with their own graph: no autocast, grad on, outside any inference mode of the caller.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for name, loader in candidates(build, device).items():
            try:
                padded, varlen, masks = loader()
            except Exception as e:  # noqa: BLE001 - unavailable, with the reason
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                results.append(KernelResult(name, False, f"unavailable: {first}"))
                continue
            passed, errors, why = check(padded, varlen, masks, device, dtype, head_dim, cases=cases,
                                        varlen_case=varlen_case)
            r = KernelResult(name, True, why, passed, errors)
            if passed and bench_shape is not False:
                try:
                    r.ms, r.ref_ms = bench(padded, varlen, device, dtype, head_dim, bench_shape)
                except Exception as e:  # noqa: BLE001
                    r.passed, r.reason = False, f"benchmark raised {type(e).__name__}: {e}"
            results.append(r)
    _CHOICES[key] = decide(results)
    return _CHOICES[key]


def failed(choice: Choice) -> list[KernelResult]:
    """The kernels that were available and failed their numerics (or raised)."""
    return [r for r in choice.results if r.available and not r.passed]


def reset() -> None:
    """Forget the cached choices (tests)."""
    _CHOICES.clear()


# ----- command line -------------------------------------------------------------------------------------
def format_choice(choice: Choice, device, dtype, head_dim: int) -> str:
    lines = [f"attention self-test on {device} ({torch.cuda.get_device_name(device) if torch.device(device).type == 'cuda' else 'cpu'}), "
             f"{str(dtype).replace('torch.', '')}, head dim {head_dim}"]
    for r in choice.results:
        state = "PASS" if r.passed else ("FAIL" if r.available else "n/a ")
        errs = " ".join(f"{k}={v:.1e}" for k, v in r.errors.items())
        timing = (f"  {r.ms:.3f} ms vs SDPA {r.ref_ms:.3f} ms ({r.speedup:.2f}x)" if r.ms and r.ref_ms else "")
        lines.append(f"  {r.name:<13}{state}  {r.reason}" + (f"\n{'':17}{errs}" if errs else "") + timing)
    lines.append(f"auto -> {choice.impl} (packed batches: {choice.varlen}); {choice.reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.kernels.selftest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-build", action="store_true", help="do not build the CUDA extension (test it only if built)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dry = device.type == "cpu" and A._interpreting()
    if not dry and (device.type != "cuda" or not torch.cuda.is_available()):
        print(f"kernels.selftest: no CUDA device here (device {args.device!r}, torch.cuda.is_available()="
              f"{torch.cuda.is_available()}); the custom attention kernels are GPU kernels, auto uses SDPA "
              "(--device cpu checks them under TRITON_INTERPRET=1)")
        return 2
    dtype = DTYPES[args.dtype]
    if dry:  # the interpreter is slow: small cases in fp32, no timing
        choice = verify(device, torch.float32, 16, build=False, cases=DRY_CASES, bench_shape=False,
                        varlen_case=DRY_VARLEN)
        dtype, head_dim = torch.float32, 16
    else:
        choice = verify(device, dtype, args.head_dim, build=not args.no_build)
        head_dim = args.head_dim
    print(format_choice(choice, device, dtype, head_dim))
    bad = failed(choice)
    if bad:
        print(f"kernels.selftest: FAILED: {', '.join(r.name for r in bad)} (auto keeps {choice.impl})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
