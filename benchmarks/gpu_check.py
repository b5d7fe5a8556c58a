"""One command for a CUDA machine: the GPU-only checks, each in its own process, into one markdown report.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out docs/gpu-check.md --budget-s 450
    python benchmarks/gpu_check.py --dry-run --out /tmp/r.md   # the whole harness on this CPU (tests run it)
    PYTHONPATH=. python3 benchmarks/gpu_check.py     # on a GPU machine with its own python3, no `make setup`

It installs nothing. Without a CUDA device it stops at once with one line (exit status 2), unless
`--dry-run`: then every check runs its CPU form (Triton interpreted, the CUDA kernels emulated on the host,
tiny shapes), so the harness itself, every script it calls and every flag it passes are exercised where
no GPU is. In order, each as a subprocess with its own timeout, all within `--budget-s`
(a check that would start with less than its minimum left is "not run"):

  selftest     python -m qwenvl_lab.kernels.selftest --device cuda (builds the CUDA extension, cold: the longest step;
               exit 1 when a kernel fails its numerics)          dry: --device cpu under TRITON_INTERPRET=1
  kernel-tests pytest on the CUDA and Triton kernel numerics tests, TRITON_INTERPRET=0 (Triton compiles for
               the GPU) and QWENVL_TEST_DEVICE=cuda (tests/conftest.py makes tensors a test creates without
               a device CUDA tensors)                             dry: the host-emulated CUDA kernel tests
  attention    benchmarks/attention.py: SDPA vs the Triton and CUDA kernels, causal forward + backward,
               bf16, 1k / 4k / 8k tokens                         dry: fp32, 64 tokens, SDPA vs eager
  real-step    benchmarks/smoke_real.py: a Qwen2.5-1.5B-shaped LM + SigLIP so400m-shaped tower, random
               weights, LoRA, bf16, gradient checkpointing on, auto attention: s/step, tokens/s, MFU
               against the measured bf16 matmul peak, peak memory against model.plan  dry: --tiny, fp32
  train-step   benchmarks/train_step.py --device cuda (ours against reference_sup)       dry: --quick
  generate     benchmarks/generate.py --device cuda (against transformers' generate)     dry: --quick
  demo         benchmarks/demo_run.py: train.py (both demo stages, a few steps) then test.py: the Trainer /
               accelerate path as a user runs it                   dry: fewer samples and steps
  qlora-step   benchmarks/qlora_step.py --device cuda (needs bitsandbytes: skipped, saying so, without it)

A check whose script is not in this tree is "missing"; one whose optional package is not installed is
"skipped (X not installed)". The exit status is 0 only when every check is ok or skipped: a failed,
timed-out, missing or not-run check fails the command. The report (`--out`, default docs/gpu-check.md)
holds the machine (GPU, CUDA, torch, transformers, commit), a table with each command, its status, its
duration and its figures (pytest's summary line, or the script's last printed lines), then each command's
output tail. `run_checks(checks, out, budget_s, runner)` is the library form (tests pass their own checks
and runner).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "gpu-check.md"
# The checks' wall-clock budget on one GPU, a cold CUDA build included: the H200's first full run took 418 s
# of checks (docs/gpu-check.md), most of it the kernel tests' Triton compiles (122 s) and the self-test's build.
BUDGET_S = 450.0
KERNEL_TESTS = ["tests/test_kernels_cuda.py", "tests/test_kernels_triton*.py", "tests/test_kernels_fused.py",
                "tests/test_kernels_dispatch.py", "tests/test_kernels_qwen.py", "tests/test_attention_prepare.py"]
TAIL_LINES = 40  # output lines kept per check in the report
FIGURE_LINES = 6  # last printed lines shown as a script's figures in the table
DRY_TIME_FACTOR = 4.0  # --dry-run's timeouts against the GPU ones
OK_STATUSES = ("ok",)  # and "skipped (...)": an optional package is not installed


@dataclass
class Check:
    name: str
    argv: list[str]  # argv[0] is replaced by this Python when it is "python"
    timeout_s: float
    needs: list[str] = field(default_factory=list)  # paths (relative to ROOT) that must exist
    env: dict[str, str] = field(default_factory=dict)
    min_s: float = 20.0  # not started with less than this left in the budget
    requires: list[str] = field(default_factory=list)  # importable modules it needs, else "skipped"


@dataclass
class Result:
    check: Check
    status: str  # ok | failed (exit N) | timeout | missing | not run | skipped (why)
    seconds: float
    output: str
    command: str

    @property
    def passed(self) -> bool:
        return self.status in OK_STATUSES or self.status.startswith("skipped")


def default_checks(dry_run: bool = False) -> list[Check]:
    """The GPU checks, or with `dry_run` their CPU forms (same scripts, tiny shapes, interpreted kernels)."""
    tests = sorted({p for pattern in KERNEL_TESTS for p in glob.glob(pattern, root_dir=ROOT)})
    gpu = not dry_run
    interp = {"TRITON_INTERPRET": "0" if gpu else "1"}
    # -rfEs: failures and skips named in the summary (the report keeps the output's tail), no captured logs
    pytest_ = ["python", "-m", "pytest", "-q", "-rfEs", "--tb=short", "--show-capture=no", "-p", "no:cacheprovider"]
    real = ["--device", "cuda", "--dtype", "bf16", "--lm-config", "configs/hub/Qwen--Qwen2.5-1.5B-Instruct.json",
            "--steps", "3", "--batch", "4", "--lora-r", "64"] if gpu else ["--device", "cpu", "--dtype", "fp32", "--tiny"]
    checks = [
        Check("selftest", ["python", "-m", "qwenvl_lab.kernels.selftest", "--device", "cuda" if gpu else "cpu"], 200,
              needs=["kernels/selftest.py"], env=interp, min_s=30),
        Check("kernel-tests", [*pytest_, *tests] if gpu else [*pytest_, "tests/test_kernels_cuda_emulated.py",
                                                             "-k", "match_eager_fp32 and gqa_tq_lt_tk"], 150,
              needs=tests or ["tests/test_kernels_cuda.py"],
              env={**interp, **({"QWENVL_TEST_DEVICE": "cuda"} if gpu else {})}, min_s=30),
        Check("attention", ["python", "benchmarks/attention.py", "--backward", *(
            ["--device", "cuda", "--dtype", "bf16", "--seqlens", "1024", "4096", "8192", "--batch", "1",
             "--heads", "16", "--head-dim", "128", "--impls", "torch", "triton", "cuda"] if gpu else
            ["--device", "cpu", "--seqlens", "64", "--impls", "torch", "eager", "--iters", "1", "--warmup", "0"])],
              60, needs=["benchmarks/attention.py"], env=interp),
        Check("real-step", ["python", "benchmarks/smoke_real.py", *real], 120, needs=["benchmarks/smoke_real.py"],
              min_s=40),
        Check("train-step", ["python", "benchmarks/train_step.py", *(["--device", "cuda"] if gpu else [
            "--device", "cpu", "--quick", "--no-stage1", "--no-memory", "--no-profile", "--no-bf16"])], 90,
              needs=["benchmarks/train_step.py"]),
        Check("generate", ["python", "benchmarks/generate.py", *(["--device", "cuda"] if gpu else
                                                                 ["--device", "cpu", "--quick", "--repeats", "1"])], 60,
              needs=["benchmarks/generate.py"]),
        Check("demo", ["python", "benchmarks/demo_run.py", *(["--n-train", "200", "--steps", "10"] if gpu else
                                                             ["--n-train", "40", "--steps", "2"])],
              150, needs=["benchmarks/demo_run.py"], min_s=40),
        Check("qlora-step", ["python", "benchmarks/qlora_step.py", "--device", "cuda" if gpu else "cpu",
                             *([] if gpu else ["--quick", "--steps", "1", "--batch-size", "2", "--seq-len", "16"])],
              75, needs=["benchmarks/qlora_step.py"], min_s=30, requires=["bitsandbytes"]),
    ]
    if dry_run:  # tiny shapes, but a CPU (maybe a loaded 2-core one) and the Triton interpreter: more time
        for c in checks:
            c.timeout_s, c.min_s = c.timeout_s * DRY_TIME_FACTOR, 0.0
    return checks


def _missing_module(names: list[str]) -> str | None:
    for name in names:
        if importlib.util.find_spec(name) is None:
            return name
    return None


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
               runner: Runner | None = None, dry_run: bool = False) -> list[Result]:
    """Run every check within the budget and write the report to `out`; returns the results."""
    runner = runner or subprocess_runner
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
        absent = _missing_module(check.requires)
        if absent:
            results.append(Result(check, f"skipped ({absent} not installed)", 0.0,
                                  f"{absent} is not installed here (an optional extra)", shown))
            continue
        left = budget_s - (time.monotonic() - start)
        if left < check.min_s:
            results.append(Result(check, "not run", 0.0, f"{left:.0f} s of the {budget_s:.0f} s budget left", shown))
            continue
        # The tree on the path: a machine with its own python3 runs the checks without installing the project.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, **check.env, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
        print(f"gpu-check: {check.name}: {shown}", flush=True)
        t0 = time.monotonic()
        code, output = runner(_command(check), env, min(check.timeout_s, left))
        seconds = time.monotonic() - t0
        status = "ok" if code == 0 else ("timeout" if code is None else f"failed (exit {code})")
        print(f"gpu-check: {check.name}: {status} in {seconds:.1f} s", flush=True)
        results.append(Result(check, status, seconds, output, shown))
        write_report(results, out, budget_s, time.monotonic() - start, dry_run)  # kept if the machine goes
    write_report(results, out, budget_s, time.monotonic() - start, dry_run)
    return results


def figures(result: Result) -> str:
    """The result's headline: pytest's summary line, else the last printed lines."""
    lines = [ln.strip() for ln in result.output.splitlines() if ln.strip()]
    if result.check.name == "kernel-tests":
        summary = [ln for ln in lines if re.search(r"\b\d+ (passed|failed|error|skipped)", ln)]
        return summary[-1].strip("= ") if summary else (lines[-1] if lines else "")
    if result.status in ("missing", "not run") or result.status.startswith("skipped"):
        return result.output
    return "<br>".join(ln.replace("|", "\\|") for ln in lines[-FIGURE_LINES:])


def _machine() -> list[str]:
    import torch

    lines = [f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
             f"- host: {platform.node()} ({platform.platform()}), Python {platform.python_version()}",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {_version('transformers')}, "
             f"peft {_version('peft')}, triton {_version('triton')}"]
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


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def write_report(results: list[Result], out: Path, budget_s: float, total_s: float, dry_run: bool = False) -> None:
    ok = sum(r.status == "ok" for r in results)
    skipped = sum(r.status.startswith("skipped") for r in results)
    title = "# GPU check (dry run on the CPU: the harness only, no GPU figures)" if dry_run else "# GPU check"
    lines = [title, "", "Written by `make gpu-check` (benchmarks/gpu_check.py).", "", *_machine(),
             f"- {ok} of {len(results)} checks ok, {skipped} skipped, in {total_s:.0f} s (budget {budget_s:.0f} s); "
             f"{'PASSED' if all(r.passed for r in results) else 'FAILED'}", "",
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
    ap.add_argument("--dry-run", action="store_true",
                    help="every check's CPU form (Triton interpreted, CUDA emulated, tiny shapes): tests the harness")
    args = ap.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an "
              "NVIDIA GPU (or --dry-run to test the harness on this CPU)", file=sys.stderr)
        return 2
    checks = default_checks(args.dry_run)
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in checks})
        if unknown:
            print(f"gpu-check: unknown check(s) {', '.join(unknown)}; valid: {', '.join(c.name for c in checks)}",
                  file=sys.stderr)
            return 2
        checks = [c for c in checks if c.name in args.only]
    results = run_checks(checks, args.out, args.budget_s, dry_run=args.dry_run)
    bad = [f"{r.check.name}: {r.status}" for r in results if not r.passed]
    print(f"gpu-check: report written to {args.out}; " + (f"FAILED ({'; '.join(bad)})" if bad else "all passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
