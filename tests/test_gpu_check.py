"""`make gpu-check` without a GPU: the one-line refusal, and the report written from fake checks.

Also the QLoRA step benchmark it runs, in its quick form on this CPU.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: gpu-check would run its checks here")
    out = tmp_path / "report.md"
    proc = subprocess.run([PY, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_report_holds_every_check_with_status_duration_and_figures(tmp_path):
    seen_env = {}

    def fake_runner(argv, env, timeout_s):
        name = argv[-1]
        seen_env[name] = env
        if name == "ok":
            return 0, "warming up\nstep_s ours=0.25 reference=0.5 ratio=0.5\npeak_mb ours=10 reference=20 ratio=0.5\n"
        if name == "fails":
            return 3, "Traceback (most recent call last):\nRuntimeError: CUDA error: no kernel image\n"
        return None, "partial output before the limit\n"  # a timeout

    checks = [
        gpu_check.Check("kernel-tests", ["python", "-m", "pytest", "ok"], 30, env={"TRITON_INTERPRET": "0"}, min_s=0),
        gpu_check.Check("fails", ["python", "x.py", "fails"], 30, min_s=0),
        gpu_check.Check("slow", ["python", "x.py", "slow"], 30, min_s=0),
        gpu_check.Check("absent", ["python", "benchmarks/not_written_yet.py"], 30,
                        needs=["benchmarks/not_written_yet.py"], min_s=0),
        gpu_check.Check("late", ["python", "x.py", "late"], 30, min_s=1e9),  # more than the budget left
    ]
    out = tmp_path / "docs" / "gpu-check.md"
    results = gpu_check.run_checks(checks, out, budget_s=100, runner=fake_runner)
    assert [r.status for r in results] == ["ok", "failed (exit 3)", "timeout", "missing", "not run"]
    assert seen_env["ok"]["TRITON_INTERPRET"] == "0" and seen_env["ok"]["HF_HUB_OFFLINE"] == "1"
    assert set(seen_env) == {"ok", "fails", "slow"}  # the missing and the late one never ran

    text = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["kernel-tests"].count("|") == 6  # check | command | status | seconds | figures
    assert "`TRITON_INTERPRET=0 python -m pytest ok`" in rows["kernel-tests"]
    assert "peak_mb ours=10 reference=20 ratio=0.5" in rows["kernel-tests"]
    assert "| failed (exit 3) |" in rows["fails"] and "| timeout |" in rows["slow"]
    assert "| missing |" in rows["absent"] and "benchmarks/not_written_yet.py" in rows["absent"]
    assert "| not run |" in rows["late"]
    assert "RuntimeError: CUDA error: no kernel image" in text  # the failing check's output is kept
    assert "partial output before the limit" in text
    assert "1 of 5 checks ok" in text


def test_pytest_summary_is_the_figure_of_the_kernel_tests():
    check = gpu_check.Check("kernel-tests", ["python", "-m", "pytest"], 10)
    out = "....s.\nSKIPPED [1] tests/x.py:3: reason\n==== 5 passed, 1 skipped in 3.2s ====\n"
    assert gpu_check.figures(gpu_check.Result(check, "ok", 3.2, out, "pytest")) == "5 passed, 1 skipped in 3.2s"


def test_a_real_timeout_is_reported_not_raised(tmp_path):
    check = gpu_check.Check("sleeper", ["python", "-c", "import time; print('started', flush=True); time.sleep(60)"],
                            timeout_s=2, min_s=0)
    [result] = gpu_check.run_checks([check], tmp_path / "r.md", budget_s=100)
    assert result.status == "timeout" and result.seconds < 30
    assert "| sleeper |" in (tmp_path / "r.md").read_text()


def test_default_checks_name_every_gpu_check_and_report_absent_scripts_as_missing(tmp_path):
    names = ["selftest", "kernel-tests", "attention", "real-step", "train-step", "generate", "demo", "qlora-step"]
    checks = gpu_check.default_checks()
    assert [c.name for c in checks] == names
    assert [c.name for c in gpu_check.default_checks(dry_run=True)] == names
    kernel = checks[1]
    assert kernel.env["TRITON_INTERPRET"] == "0" and kernel.env["QWENVL_TEST_DEVICE"] == "cuda"
    assert "tests/test_kernels_cuda.py" in kernel.argv and "tests/test_attention_prepare.py" in kernel.argv
    assert all("cuda" in c.argv for c in checks if c.name not in ("kernel-tests", "demo"))
    assert "--seqlens" in checks[2].argv and checks[2].argv[checks[2].argv.index("--seqlens") + 1:][:3] == [
        "1024", "4096", "8192"]
    results = gpu_check.run_checks(checks, tmp_path / "r.md", budget_s=10_000, runner=lambda a, e, t: (0, "fake"))
    for check, result in zip(checks, results):
        absent = any(not (ROOT / p).exists() for p in check.needs)
        assert (result.status == "missing") == absent, (check.name, result.status)


def test_exit_status_fails_on_missing_not_run_and_failed_checks_and_passes_skipped_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU branch of main(), with fake checks
    outcome = {}

    def fake_checks(dry_run=False):
        return [gpu_check.Check("good", ["python", "good"], 10, min_s=0),
                gpu_check.Check("optional", ["python", "opt"], 10, min_s=0, requires=["no_such_module_xyz"]),
                *outcome["extra"]]

    monkeypatch.setattr(gpu_check, "default_checks", fake_checks)
    monkeypatch.setattr(gpu_check, "subprocess_runner", lambda a, e, t: (0, "fine"))
    monkeypatch.setattr(gpu_check, "_machine", lambda: ["- machine: (test)"])
    outcome["extra"] = []
    assert gpu_check.main(["--out", str(tmp_path / "a.md")]) == 0
    assert "| skipped (no_such_module_xyz not installed) |" in (tmp_path / "a.md").read_text()
    for extra in ([gpu_check.Check("gone", ["python", "x.py"], 10, needs=["benchmarks/not_here.py"])],
                  [gpu_check.Check("late", ["python", "x.py"], 10, min_s=1e9)]):
        outcome["extra"] = extra
        assert gpu_check.main(["--out", str(tmp_path / "b.md")]) == 1, extra[0].name


@pytest.mark.slow
def test_dry_run_runs_the_whole_harness_on_this_cpu_and_catches_a_broken_kernel(tmp_path):
    """Every check's CPU form through the real scripts (Triton interpreted, CUDA emulated): a wrong flag or a
    missing script fails here, not on the GPU machine. Then a planted fault in the Triton kernel fails it."""
    out = tmp_path / "dry.md"
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1")
    env.pop("QWENVL_TEST_DEVICE", None)
    proc = subprocess.run([PY, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--budget-s", "2400"], cwd=ROOT, capture_output=True, text=True, timeout=2700, env=env)
    text = out.read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + text[-6000:]
    rows = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ") and "`" in ln}
    assert set(rows) == {c.name for c in gpu_check.default_checks(dry_run=True)}
    assert all("| ok |" in r or "| skipped (" in r for r in rows.values()), rows
    assert "triton       PASS" in text and "demo_run: test.py: exit 0" in text

    broken = subprocess.run([PY, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--only", "selftest",
                             "--out", str(tmp_path / "broken.md")], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=dict(env, QWENVL_SELFTEST_BREAK="triton"))
    assert broken.returncode == 1, broken.stdout
    report = (tmp_path / "broken.md").read_text()
    assert "| selftest |" in report and "| failed (exit 1) |" in report
    assert "triton       FAIL  errors above" in report and "FAILED: triton (auto keeps torch)" in report


def test_qlora_step_benchmark_quick_on_cpu(capsys):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pytest.skip("bitsandbytes is not installed: pip install -e '.[qlora]' (make setup installs it)")
    from benchmarks import qlora_step

    res = qlora_step.main(["--device", "cpu", "--quick", "--steps", "2", "--batch-size", "2", "--seq-len", "16"])
    assert "qlora_step device=cpu layers_4bit=10 " in capsys.readouterr().out
    assert res["layers_4bit"] == 10 and res["trainable"] > 0  # 2 layers x (c_attn, c_proj, w1, w2, mlp c_proj)
    assert 0.25 < res["ratio"] < 0.5  # the tiny layers' quantisation tables weigh; ~0.26 at real sizes
    assert math.isfinite(res["loss_first"]) and math.isfinite(res["loss_last"]) and res["step_s"] > 0
