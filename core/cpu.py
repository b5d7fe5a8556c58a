"""What this CPU offers, read from /proc/cpuinfo (no torch): its feature flags and whether bf16 matmuls are native.

Contract
--------
- `cpu_flags(path=CPUINFO) -> set[str]`: the first processor's flags (x86 `flags`, arm `Features`); empty where
  the file is missing.
- `cpu_native_bf16() -> (bool, reason)`: native where the CPU has AMX-BF16 or AVX512-BF16; elsewhere bf16 matmuls
  are emulated. Used by `dtype: auto` (`model.dtypes`) and by the greedy head's screens (`qwen.generation`).
"""

from __future__ import annotations

from pathlib import Path

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either makes bf16 matmuls native on x86
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
