"""One command for a CUDA machine: the GPU-only checks, each in its own process, into one markdown report.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out docs/gpu-check.md --budget-s 480

Meant for a fresh clone after `make setup`: it installs nothing. Without a CUDA device it stops at once
with one line (exit status 2). Otherwise it runs, in order, each as a subprocess with its own timeout and
all within `--budget-s` (450 s by default, so the whole command stays under 8 minutes; a check that would start with less than its minimum left
is reported "not run"):

  kernel-tests   pytest on the CUDA and Triton kernel numerics tests, with TRITON_INTERPRET=0 (Triton
                 compiles for the GPU instead of interpreting) and QWENVL_TEST_DEVICE=cuda (tests/conftest.py
                 makes tensors that a test creates without a device CUDA tensors)
  selftest       python -m kernels.selftest --device cuda (the attention kernels against SDPA)
  smoke-real     python benchmarks/smoke_real.py --device cuda --dtype bf16 (a LoRA step at real shapes)
  qlora-step     python benchmarks/qlora_step.py --device cuda (4-bit NF4 base weights + LoRA training steps)
  train-step     python benchmarks/train_step.py --device cuda
  attention      python benchmarks/attention.py --device cuda

A check whose script is not in this tree is reported "missing". The report (`--out`, default
docs/gpu-check.md) holds the machine (GPU, driver-visible CUDA, torch, commit), a table with each
command, its status (ok / failed (exit N) / timeout / missing / not run), its duration and its figures
(pytest's summary line, or the script's last printed lines), then each command's output tail.
`run_checks(checks, out, budget_s, runner)` is the library form (tests pass their own checks and runner).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "gpu-check.md"
BUDGET_S = 450.0  # the checks' share of 8 minutes on one GPU (the rest: this script's start and report)
KERNEL_TESTS = ["tests/test_kernels_cuda.py", "tests/test_kernels_triton*.py", "tests/test_kernels_fused.py",
                "tests/test_kernels_dispatch.py", "tests/test_kernels_qwen.py"]
TAIL_LINES = 40  # output lines kept per check in the report
FIGURE_LINES = 6  # last printed lines shown as a script's figures in the table


@dataclass
class Check:
    name: str
    argv: list[str]  # argv[0] is replaced by this Python when it is "python"
    timeout_s: float
    needs: list[str] = field(default_factory=list)  # paths (relative to ROOT) that must exist
    env: dict[str, str] = field(default_factory=dict)
    min_s: float = 20.0  # not started with less than this left in the budget


@dataclass
class Result:
    check: Check
    status: str  # ok | failed (exit N) | timeout | missing | not run
    seconds: float
    output: str
    command: str


def default_checks() -> list[Check]:
    tests = sorted({p for pattern in KERNEL_TESTS for p in glob.glob(pattern, root_dir=ROOT)})
    return [
        Check("kernel-tests", ["python", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests], 150,
              needs=tests or ["tests/test_kernels_cuda.py"],
              env={"TRITON_INTERPRET": "0", "QWENVL_TEST_DEVICE": "cuda"}, min_s=60),
        Check("selftest", ["python", "-m", "kernels.selftest", "--device", "cuda"], 60, needs=["kernels/selftest.py"]),
        Check("smoke-real", ["python", "benchmarks/smoke_real.py", "--device", "cuda", "--dtype", "bf16"], 90,
              needs=["benchmarks/smoke_real.py"], min_s=40),
        Check("qlora-step", ["python", "benchmarks/qlora_step.py", "--device", "cuda"], 75,
              needs=["benchmarks/qlora_step.py"], min_s=40),
        Check("train-step", ["python", "benchmarks/train_step.py", "--device", "cuda"], 60,
              needs=["benchmarks/train_step.py"]),
        Check("attention", ["python", "benchmarks/attention.py", "--device", "cuda"], 45,
              needs=["benchmarks/attention.py"]),
    ]


Runner = Callable[[list[str], dict, float], tuple[int | None, str]]


def subprocess_runner(argv: list[str], env: dict, timeout_s: float) -> tuple[int | None, str]:
    """(exit status or None on timeout, stdout + stderr)."""
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out
    return proc.returncode, proc.stdout


def _command(check: Check) -> list[str]:
    return [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(check.argv)]


def run_checks(checks: list[Check], out: Path = DEFAULT_OUT, budget_s: float = BUDGET_S,
               runner: Runner = subprocess_runner) -> list[Result]:
    """Run every check within the budget and write the report to `out`; returns the results."""
    start = time.monotonic()
    results = []
    for check in checks:
        shown = " ".join(("python" if i == 0 and a == "python" else a) for i, a in enumerate(check.argv))
        env_text = " ".join(f"{k}={v}" for k, v in check.env.items())
        shown = f"{env_text} {shown}".strip()
        missing = [p for p in check.needs if not (ROOT / p).exists()]
        if missing:
            results.append(Result(check, "missing", 0.0, f"not in this tree: {', '.join(missing)}", shown))
            continue
        left = budget_s - (time.monotonic() - start)
        if left < check.min_s:
            results.append(Result(check, "not run", 0.0, f"{left:.0f} s of the {budget_s:.0f} s budget left", shown))
            continue
        env = dict(os.environ, **check.env, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        print(f"gpu-check: {check.name}: {shown}", flush=True)
        t0 = time.monotonic()
        code, output = runner(_command(check), env, min(check.timeout_s, left))
        seconds = time.monotonic() - t0
        status = "ok" if code == 0 else ("timeout" if code is None else f"failed (exit {code})")
        print(f"gpu-check: {check.name}: {status} in {seconds:.1f} s", flush=True)
        results.append(Result(check, status, seconds, output, shown))
    write_report(results, out, budget_s, time.monotonic() - start)
    return results


def figures(result: Result) -> str:
    """The result's headline: pytest's summary line, else the last printed lines."""
    lines = [ln.strip() for ln in result.output.splitlines() if ln.strip()]
    if result.check.name == "kernel-tests":
        summary = [ln for ln in lines if re.search(r"\b\d+ (passed|failed|error|skipped)", ln)]
        return summary[-1].strip("= ") if summary else (lines[-1] if lines else "")
    if result.status in ("missing", "not run"):
        return result.output
    return "<br>".join(ln.replace("|", "\\|") for ln in lines[-FIGURE_LINES:])


def _machine() -> list[str]:
    import torch

    lines = [f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
             f"- host: {platform.node()} ({platform.platform()}), Python {platform.python_version()}",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
                     f"{torch.cuda.device_count()} visible")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        lines.append(f"- commit: {commit or 'unknown'}")
    except (OSError, subprocess.SubprocessError):
        pass
    return lines


def write_report(results: list[Result], out: Path, budget_s: float, total_s: float) -> None:
    ok = sum(r.status == "ok" for r in results)
    lines = ["# GPU check", "", "Written by `make gpu-check` (benchmarks/gpu_check.py).", "", *_machine(),
             f"- {ok} of {len(results)} checks ok in {total_s:.0f} s (budget {budget_s:.0f} s)", "",
             "| check | command | status | seconds | figures |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.check.name} | `{r.command}` | {r.status} | {r.seconds:.1f} | {figures(r)} |")
    for r in results:
        lines += ["", f"## {r.check.name}: {r.status}", "", f"`{r.command}`", ""]
        tail = r.output.splitlines()[-TAIL_LINES:]
        lines += ["```", *tail, "```"] if tail else ["(no output)"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the markdown report (default docs/gpu-check.md)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget for all checks")
    ap.add_argument("--only", nargs="+", default=None, help="run only these checks (names as in the report)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an "
              "NVIDIA GPU after `make setup`", file=sys.stderr)
        return 2
    checks = default_checks()
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in checks})
        if unknown:
            print(f"gpu-check: unknown check(s) {', '.join(unknown)}; valid: {', '.join(c.name for c in checks)}",
                  file=sys.stderr)
            return 2
        checks = [c for c in checks if c.name in args.only]
    results = run_checks(checks, args.out, args.budget_s)
    print(f"gpu-check: report written to {args.out}")
    return 0 if all(r.status in ("ok", "missing") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
