"""The CUDA C++ kernels' numerics without a GPU: `kernels/csrc/emulate_host.cpp` compiles the kernels
of flash_attn.cu with the host C++ compiler and runs every CUDA thread as a std::thread (shared memory
and __syncthreads emulated). Outputs and gradients are compared with the eager fp32 reference."""

import math
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from qwenvl_lab.kernels import cuda_ext
from qwenvl_lab.kernels.attention import eager_attention

CSRC = Path(cuda_ext.__file__).resolve().parent / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    home = cuda_ext._find_cuda_home()
    if cxx is None or home is None or not (Path(home) / "include" / "cuda_fp16.h").is_file():
        pytest.skip("needs a host C++ compiler and the CUDA headers (cuda_fp16.h)")
    exe = tmp_path_factory.mktemp("emu") / "emulate_host"
    proc = subprocess.run([cxx, "-std=c++20", "-O2", f"-I{home}/include", str(CSRC / "emulate_host.cpp"),
                           "-o", str(exe), "-lpthread"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def _run(exe: Path, tmp: Path, q, k, v, g, causal: bool, dtype: torch.dtype):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d)
    (tmp / "in.bin").write_bytes(
        struct.pack("8if", b, hq, hkv, tq, tk, d, int(causal), DTYPE_CODES[dtype], scale)
        + b"".join(t.detach().float().numpy().astype(np.float32).tobytes() for t in (q, k, v, g)))
    subprocess.run([str(exe), str(tmp / "in.bin"), str(tmp / "out.bin")], check=True, timeout=120)
    raw = torch.from_numpy(np.fromfile(tmp / "out.bin", dtype=np.float32))
    sizes = [q.numel(), b * hq * tq, q.numel(), k.numel(), v.numel()]
    out, lse, dq, dk, dv = raw.split(sizes)
    return out.view_as(q), lse.view(b, hq, tq), dq.view_as(q), dk.view_as(k), dv.view_as(v)


CASES = {
    "non_causal": (1, 2, 2, 20, 20, 16, False),
    "causal_multi_block": (1, 2, 2, 70, 70, 16, True),  # > kRows=64 rows, > kCols=32 keys
    "gqa_tq_lt_tk": (2, 4, 2, 13, 100, 32, True),
    "tq_gt_tk_empty_rows": (1, 2, 1, 90, 17, 24, True),
    "head_dim_128": (1, 2, 2, 40, 40, 128, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_cuda_kernels_match_eager_fp32(emulator, tmp_path, case):
    b, hq, hkv, tq, tk, d, causal = CASES[case]
    q = torch.randn(b, hq, tq, d, requires_grad=True)
    k = torch.randn(b, hkv, tk, d, requires_grad=True)
    v = torch.randn(b, hkv, tk, d, requires_grad=True)
    g = torch.randn(b, hq, tq, d)
    out, lse, dq, dk, dv = _run(emulator, tmp_path, q, k, v, g, causal, torch.float32)
    ref = eager_attention(q, k, v, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert (out - ref).abs().max().item() <= 1e-4
    for got, want in zip((dq, dk, dv), ref_grads):
        assert (got - want).abs().max().item() <= 1e-4
    # lse = log sum_j exp(s_ij) over visible keys, from its definition (rows with no key: 0).
    s = (q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2)).detach() / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq).logical_not(), float("-inf"))
    want_lse = torch.logsumexp(s, -1).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    assert (lse - want_lse).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_emulated_cuda_kernels_half_precision(emulator, tmp_path, dtype, tol):
    # Inputs rounded to the dtype first so the reference sees what the kernel sees.
    q, k, v = (torch.randn(1, 2, 33, 64).to(dtype).float().requires_grad_() for _ in range(3))
    g = torch.randn(1, 2, 33, 64).to(dtype).float()
    out, _, dq, dk, dv = _run(emulator, tmp_path, q, k, v, g, True, dtype)
    ref = eager_attention(q, k, v, causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert (out - ref).abs().max().item() <= tol
    for got, want in zip((dq, dk, dv), ref_grads):
        assert (got - want).abs().max().item() <= 2 * tol
