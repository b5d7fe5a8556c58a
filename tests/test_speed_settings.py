"""trainer/speed_settings.py applies the run's speed keys; trainer/cpu_malloc.py switches glibc's allocator."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from qwenvl_lab.core.config_io import ConfigError
from qwenvl_lab.model.train_config import TrainConfig
from qwenvl_lab.trainer.speed_settings import apply_speed_settings

from tests.tiny_opt import tiny_vlm


def _cfg(**kw):
    base = {k: getattr(TrainConfig, k) for k in ("retain_freed_memory", "fused_impl", "compile_lm")}
    return SimpleNamespace(**{**base, **kw})


def test_defaults_and_fused_impl(tmp_path):
    vlm = tiny_vlm(tmp_path)
    done = apply_speed_settings(_cfg(), vlm)
    glibc_cpu = sys.platform.startswith("linux") and not torch.cuda.is_available()
    assert done == ({"retain_freed_memory": True} if glibc_cpu else {})  # on by default on a CPU; LM keys opt-in
    assert vlm.lm.config.fused_impl == "torch"  # the model's default until fused kernels are measured on a GPU
    done = apply_speed_settings(_cfg(fused_impl="compile", retain_freed_memory=False), vlm)
    assert done == {"fused_impl": "compile"}
    assert vlm.lm.config.fused_impl == "compile" and vlm.lm.transformer.ln_f.impl == "compile"
    with pytest.raises(ConfigError, match="fused_impl"):
        apply_speed_settings(_cfg(fused_impl="fastest", retain_freed_memory=False), vlm)


def test_lm_keys_need_the_qwen_lm(tmp_path):
    vlm = tiny_vlm(tmp_path, backend="hf")
    with pytest.raises(ConfigError, match="lm_backend=qwen"):
        apply_speed_settings(_cfg(compile_lm=True, retain_freed_memory=False), vlm)


def _mallinfo():
    """glibc's `mallinfo2()`: `hblkhd` = bytes held in mmap-ed blocks, `fordblks` = free bytes in the heap."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                          "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_retain_freed_memory_round_trip():
    from qwenvl_lab.trainer.cpu_malloc import retain_freed_memory

    def grows() -> tuple[int, int]:  # (mmap-ed bytes a fresh large tensor adds, its size)
        before = _mallinfo()
        # Larger than all free heap memory, so no free chunk can serve it: glibc either extends its heap or
        # maps a fresh block, whichever the setting says (earlier tests may have left big free chunks).
        n = max(4 << 20, int(before.fordblks) + (4 << 20))
        x = torch.empty(n // 4)
        grown = int(_mallinfo().hblkhd) - int(before.hblkhd)
        del x
        return grown, n

    try:
        assert retain_freed_memory(True)
        assert grows()[0] == 0  # served from the heap
        assert retain_freed_memory(False)
        grown, n = grows()
        assert grown >= n  # glibc's default: a large block is a fresh mmap again
    finally:
        retain_freed_memory(False)
