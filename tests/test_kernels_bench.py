"""benchmarks/attention.py runs on a CPU: CPU implementations timed, GPU ones skipped with a message."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_benchmark_cpu_table(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    csv_path = tmp_path / "bench.csv"
    rows = bench.main(["--seqlens", "16", "32", "--batch", "1", "--heads", "2", "--head-dim", "16",
                       "--warmup", "0", "--iters", "1", "--backward", "--csv", str(csv_path)])
    out = capsys.readouterr().out
    assert "triton: skipped, needs a CUDA GPU" in out and "cuda: skipped, needs a CUDA GPU" in out
    assert [(r["seqlen"], r["impl"]) for r in rows] == [(16, "torch"), (16, "eager"), (32, "torch"), (32, "eager")]
    assert all(r["ms"] > 0 and r["peak_mb"] >= 0 for r in rows)
    assert "seqlen" in out and csv_path.read_text().startswith("seqlen,impl,ms,peak_mb")
