"""The CUDA C++ flash attention: it compiles and loads here (no GPU needed); numerics need a GPU.

The build test is slow-ish (tens of seconds: nvcc for one arch + the torch binding). It builds once
per session into a temporary cache, or into `$QWENVL_KERNEL_CACHE` when set (then reruns are fast).
"""

import os
from pathlib import Path

import pytest
import torch
from qwenvl_lab.kernels import cuda_ext
from qwenvl_lab.kernels.attention import attention, eager_attention

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def _toolkit_missing() -> str | None:
    if torch.version.cuda is None:
        return "torch built without CUDA"
    home = cuda_ext._find_cuda_home()
    if home is None or not (Path(home) / "include" / "cuda_runtime.h").is_file():
        return f"no CUDA toolkit (CUDA_HOME={home})"
    return None


@pytest.fixture(scope="session")
def flash_ext(tmp_path_factory):
    reason = _toolkit_missing()
    if reason:
        pytest.skip(reason)
    mp = pytest.MonkeyPatch()
    if not os.environ.get("QWENVL_KERNEL_CACHE"):
        mp.setenv("QWENVL_KERNEL_CACHE", str(tmp_path_factory.mktemp("flash_ext")))
    try:
        cuda_ext.reset()
        yield cuda_ext.load()
    finally:
        mp.undo()


@pytest.mark.slow
def test_extension_compiles_and_loads(flash_ext):
    assert cuda_ext.is_built()
    assert cuda_ext.load() is flash_ext  # cached in the process
    assert {"fwd", "bwd", "max_head_dim"} <= set(dir(flash_ext))
    assert flash_ext.max_head_dim() == 128  # a host call into the compiled library
    assert (cuda_ext.cache_dir() / f"{cuda_ext.EXT_NAME}.so").is_file()
    # The binding's own argument checks run on the host and name the problem.
    q = torch.randn(1, 2, 4, 16, device="cpu")  # a CPU tensor on purpose, whatever the default device
    with pytest.raises(RuntimeError, match="must be CUDA tensors"):
        flash_ext.fwd(q, q, q, True, 0.25)


def _qkv(b, hq, hkv, tq, tk, d, dtype):
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True)  # noqa: E731
    return mk(b, hq, tq, d), mk(b, hkv, tk, d), mk(b, hkv, tk, d)


GPU_CASES = [
    (2, 4, 4, 70, 70, 64, False),
    (2, 4, 4, 70, 70, 64, True),
    (1, 4, 2, 33, 130, 128, True),  # GQA, Tq < Tk bottom-right causal, D = 128
    (1, 2, 1, 40, 17, 80, True),  # Tq > Tk: some rows see nothing
]


@needs_gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_kernels_match_eager_fp32(flash_ext, impl, case):
    *shape, causal = case
    q, k, v = _qkv(*shape, torch.float32)
    g = torch.randn_like(q)
    out = attention(q, k, v, causal=causal, impl=impl)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = eager_attention(q, k, v, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert (out - ref).abs().max().item() <= 1e-4
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max().item() <= 1e-4


@needs_gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernels_half_precision(flash_ext, impl, dtype):
    q, k, v = _qkv(2, 4, 2, 64, 64, 64, dtype)
    out = attention(q, k, v, causal=True, impl=impl)
    ref = eager_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    assert (out.float() - ref.float()).abs().max().item() <= (2e-2 if dtype == torch.bfloat16 else 4e-3)


@needs_gpu
def test_gpu_cuda_varlen_and_auto(flash_ext):
    cu = torch.tensor([0, 5, 40, 41], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(41, 4, 32, device="cuda") for _ in range(3))
    out = attention(q, k, v, causal=True, cu_seqlens=cu, impl="cuda")
    ref = attention(q, k, v, causal=True, cu_seqlens=cu, impl="eager")
    assert (out - ref).abs().max().item() <= 1e-4
    qb, kb, vb = (x[:5].transpose(0, 1)[None] for x in (q, k, v))
    assert (attention(qb, kb, vb, causal=True) - eager_attention(qb, kb, vb, causal=True)).abs().max() <= 1e-4
