"""Which dtype the base weights use (`dtype: auto`), and fp32 for whatever trains.

Contract:
- `auto_decision(device=None) -> DtypeDecision(dtype, reason)`: bf16 where the device computes bf16
  natively (a CUDA GPU of compute capability >= 8.0; a CPU whose /proc/cpuinfo flags hold `amx_bf16` or
  `avx512_bf16`), else fp32 — on a CPU without them a bf16 matmul is emulated and runs ~25x slower than
  fp32. `device=None` is the device a run would use: CUDA when available, else the CPU. The environment
  variable `QWENVL_AUTO_DTYPE=float32|bfloat16` overrides the detection (the test suite pins float32).
- `torch_dtype(name)`: `"float32" | "bfloat16" | "float16" | "auto"` -> torch dtype; `auto` is decided by
  `auto_decision()` and its reason is logged once per process.
- `built_in(dtype)`: a context in which new floating tensors (parameters of a module being constructed)
  are `dtype`; a random-weight (scratch) LM is built in its base dtype directly, not in fp32 and then cast
  (which held both copies at once: +2 bytes per parameter of peak host memory for a bf16 build).
- `upcast_trainable(module) -> int`: every parameter that requires grad (projector, LoRA, unfrozen parts)
  goes to fp32 (the master weights; compute may still run under bf16 autocast), with the floating buffers
  of the modules that own one (BatchNorm running statistics); returns how many tensors moved.
- `part_report(vlm) -> list[PartDtype]` and `describe_parts(vlm) -> str`: per top-level part (towers,
  projector, lm, token_rows) its dtype(s), bytes and trainable/frozen bytes, for the run log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..core.cpu import CPU_BF16_FLAGS, CPUINFO, cpu_flags, cpu_native_bf16  # noqa: F401 (re-exported)
from ..kernels._log import log_once

log = logging.getLogger(__name__)

NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
ENV_OVERRIDE = "QWENVL_AUTO_DTYPE"


@dataclass(frozen=True)
class DtypeDecision:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return next(k for k, v in NAMES.items() if v == self.dtype)


def cuda_native_bf16(index: int | None = None) -> tuple[bool, str]:
    """(bf16 is native, the GPU's name and capability). Ampere (8.0) and later have bf16 tensor cores;
    older GPUs only emulate it."""
    i = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(i)
    return (major, minor) >= (8, 0), f"{torch.cuda.get_device_name(i)}, compute capability {major}.{minor}"


def auto_decision(device: str | torch.device | None = None) -> DtypeDecision:
    """What `dtype: auto` means on `device` (see the module docstring)."""
    forced = os.environ.get(ENV_OVERRIDE, "").strip()
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"{ENV_OVERRIDE}={forced!r}; valid: float32, bfloat16")
        return DtypeDecision(NAMES[forced], f"{ENV_OVERRIDE}={forced}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        native, what = cuda_native_bf16(device.index)
        if native:
            return DtypeDecision(torch.bfloat16, f"bf16 is native on this GPU ({what})")
        return DtypeDecision(torch.float32, f"this GPU has no native bf16 ({what})")
    native, what = cpu_native_bf16()
    return DtypeDecision(torch.bfloat16 if native else torch.float32, what)


def torch_dtype(name: str) -> torch.dtype:
    """A dtype name (or `auto`) -> torch dtype; the `auto` decision is logged once per process."""
    if name == AUTO:
        d = auto_decision()
        log_once(log, f"dtype-auto:{d.name}:{d.reason}", logging.INFO,
                 "dtype=auto -> %s for the base weights (%s); trainable parameters stay fp32", d.name, d.reason)
        return d.dtype
    if name not in NAMES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join([*NAMES, AUTO])}")
    return NAMES[name]


@contextmanager
def built_in(dtype: torch.dtype) -> Iterator[None]:
    """Floating tensors created inside default to `dtype`; the previous default is restored on exit."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def upcast_trainable(module: nn.Module) -> int:
    """Parameters that require grad -> fp32 in place (fp32 master weights), and the floating buffers of the
    modules that own them (a trainable BatchNorm's running statistics: its kernel wants them in its
    parameters' dtype); returns how many tensors moved."""
    moved = 0
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()  # same Parameter object: references held elsewhere stay valid
            moved += 1
    for m in module.modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        for name, b in list(m.named_buffers(recurse=False)):
            if b.is_floating_point() and b.dtype != torch.float32:
                setattr(m, name, b.float())  # stays a registered buffer
                moved += 1
    return moved


@dataclass
class PartDtype:
    part: str
    dtypes: list[str]
    bytes: int
    trainable_bytes: int
    params: int


def part_report(vlm: nn.Module) -> list[PartDtype]:
    """Per top-level part (towers, projector, lm, token_rows, ...): its parameter dtypes, bytes (tied tensors
    once) and the trainable share. Parts come from the parameter names, so a new part is never left out."""
    out: dict[str, PartDtype] = {}
    for name, p in vlm.named_parameters():  # tied tensors are yielded once
        part = name.split(".")[0]
        r = out.setdefault(part, PartDtype(part, [], 0, 0, 0))
        dt = str(p.dtype).replace("torch.", "")
        if dt not in r.dtypes:
            r.dtypes = sorted(r.dtypes + [dt])
        size = p.numel() * p.element_size()
        r.bytes, r.params = r.bytes + size, r.params + p.numel()
        r.trainable_bytes += size if p.requires_grad else 0
    return list(out.values())


def describe_parts(vlm: nn.Module) -> str:
    """One line per part: `towers      bfloat16   856.4 MB (0.0 MB trainable, 428,225,600 params)`."""
    lines = []
    for r in part_report(vlm):
        lines.append(f"  {r.part:<10} {'+'.join(r.dtypes) or '-':<17} {r.bytes / 1e6:>10.1f} MB "
                     f"({r.trainable_bytes / 1e6:.1f} MB trainable, {r.params:,} params)")
    return "\n".join(lines)
