"""What this CPU offers, read from /proc/cpuinfo (no torch): its feature flags and whether bf16 matmuls are native.

Contract
--------
- `cpu_flags(path=CPUINFO) -> set[str]`: the first processor's flags (x86 `flags`, arm `Features`); empty where
  the file is missing.
- `cpu_native_bf16() -> (bool, reason)`: native where the CPU has AMX-BF16 or AVX512-BF16; elsewhere bf16 matmuls
  are emulated. Used by `dtype: auto` (`model.dtypes`) and by the greedy head's screens (`qwen.generation`).
- `cpu_int8_dot() -> bool`: the CPU has an int8 dot product with int32 sums (AMX-INT8, AVX512-VNNI or AVX-VNNI).
  Without one, int8 matmul kernels pair u8 x s8 products into saturating int16 sums (AVX2's vpmaddubsw), so
  their results are not exact; the greedy head's int8 x int8 screen is offered only with one.
"""

from __future__ import annotations

from pathlib import Path

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either makes bf16 matmuls native on x86
CPU_INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # int8 dot products summed in int32, exactly
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(path: Path = CPUINFO) -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm
            return set(value.split())
    return set()


def cpu_native_bf16() -> tuple[bool, str]:
    flags = cpu_flags()
    have = [f for f in CPU_BF16_FLAGS if f in flags]
    if have:
        return True, f"the CPU has {'/'.join(have)}"
    return False, ("the CPU has neither AMX nor AVX512-BF16, so bf16 matmuls are emulated (~25x slower "
                   "than fp32 on such a CPU)")


def cpu_int8_dot() -> bool:
    return any(f in cpu_flags() for f in CPU_INT8_DOT_FLAGS)
