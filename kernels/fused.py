"""Fused RMSNorm, rotary embedding and SwiGLU behind a switch, with torch references.

Contract
--------
* `rms_norm(x [..., N], weight [N], eps, impl="auto")` = `weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps))
  .to(x.dtype)` — Qwen's semantics: normalise in fp32, cast back, then multiply by the weight.
* `apply_rotary(x [B, H, T, D], cos, sin, impl="auto")`, cos/sin fp32 `[B, T, D]` or `[T, D]` with
  duplicated halves: `x_fp32 * cos + rotate_half(x_fp32) * sin` cast back to x's dtype, where
  `rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])` (GPT-NeoX style).
* `swiglu(up [..., I], gate [..., I], impl="auto")` = `up * silu(gate)` (Qwen's MLP activation).
* `impl`:
  - `torch`: the references above (eager ops; run anywhere);
  - `triton`: hand-written kernels (`kernels/triton_fused.py`; CUDA tensors, or CPU tensors under
    `TRITON_INTERPRET=1`; raises otherwise);
  - `compile`: the torch reference compiled by `torch.compile` (inductor: C++/OpenMP kernels on a CPU,
    Triton on a GPU), one fused forward and one fused backward kernel per op. The first use per
    (op, device, dtype) runs a small forward + backward probe; if compiling fails (no C++ compiler, an
    unsupported torch), the reason is logged once and that op uses `torch` for the rest of the process;
  - `auto`: Triton for CUDA tensors when it imports, else torch (a failed import is logged once).
* Every implementation is differentiable (rotary: in x only) and matches `torch` within float
  rounding (fp32: 1e-5).
"""

from __future__ import annotations

import importlib
import logging
import os

import torch
import torch.nn.functional as F

from ._log import log_once

log = logging.getLogger(__name__)

FUSED_IMPLS = ("auto", "torch", "triton", "compile")


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if cos.dim() == 3:  # [B, T, D] -> [B, 1, T, D] to broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def swiglu_torch(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return up * F.silu(gate)


REFERENCES = {"rms_norm": rms_norm_torch, "apply_rotary": apply_rotary_torch, "swiglu": swiglu_torch}

# ----- impl="compile": inductor-generated fused kernels ------------------------------------------------
_COMPILED: dict[str, object] = {}
_PROBED: dict[tuple[str, str, torch.dtype], bool] = {}  # (op, device type, dtype) -> compiled path works


def _probe_args(op: str, device: torch.device, dtype: torch.dtype) -> tuple:
    # Sizes >= 2 everywhere so the dynamic-shape graph is not specialised to 0/1-sized dimensions.
    def t(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    if op == "rms_norm":
        return t(2, 3, 8), t(8), 1e-6
    if op == "apply_rotary":
        f = torch.randn(2, 3, 8, device=device)
        return t(2, 2, 3, 8), f.cos(), f.sin()
    return t(2, 3, 8), t(2, 3, 8)


def _compiled(op: str, args: tuple):
    """The compiled reference for `op`, or None when compiling does not work here (logged once)."""
    x = args[0]
    key = (op, x.device.type, x.dtype)
    if key not in _PROBED:
        try:
            fn = _COMPILED.get(op)
            if fn is None:
                fn = _COMPILED[op] = torch.compile(REFERENCES[op], dynamic=True)
            probe = _probe_args(op, x.device, x.dtype)
            with torch.enable_grad():
                out = fn(*probe)
                out.float().sum().backward()  # compiles the backward kernel too
            _PROBED[key] = True
        except Exception as e:  # noqa: BLE001 - any compile failure means "use the reference"
            _PROBED[key] = False
            log_once(log, f"fused:compile:{op}", logging.WARNING,
                     "%s impl=compile failed on %s/%s, using torch: %s: %s", op, x.device.type, x.dtype,
                     type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return _COMPILED[op] if _PROBED[key] else None


def _resolve(impl: str, x: torch.Tensor, op: str) -> str:
    if impl not in FUSED_IMPLS:
        raise ValueError(f"unknown {op} impl {impl!r}; valid: {', '.join(FUSED_IMPLS)}")
    if impl == "compile":
        return "compile"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if impl == "torch" or (impl == "auto" and x.device.type != "cuda"):
        return "torch"
    if impl == "triton" and x.device.type != "cuda" and not interpreting:
        raise RuntimeError(f"{op} impl='triton' needs CUDA tensors (got {x.device}), or "
                           "TRITON_INTERPRET=1 set before triton is imported")
    try:
        importlib.import_module(".triton_fused", __package__)  # through sys.modules (a test can hide it)
    except Exception as e:  # noqa: BLE001 - any import failure means "use the reference"
        log_once(log, f"fused:{op}", logging.WARNING, "%s impl=%s unavailable, using torch: %s", op, impl, e)
        return "torch"
    return "triton"


def _dispatch(op: str, impl: str, args: tuple):
    """Run `op` with the implementation `impl` resolves to (see the module docstring)."""
    chosen = _resolve(impl, args[0], op)
    if chosen == "compile":
        fn = _compiled(op, args)
        return (fn or REFERENCES[op])(*args)
    if chosen == "torch":
        return REFERENCES[op](*args)
    from . import triton_fused

    return getattr(triton_fused, op)(*args)


def _check_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        return  # checked eagerly already; under torch.compile a shape test would specialise the graph
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: x must be [B, H, T, D] with even D, got {tuple(x.shape)}")
    B, _, T, D = x.shape
    ok = {(T, D), (B, T, D)} if cos.dim() == 3 else {(T, D)}
    if tuple(cos.shape) not in ok or cos.shape != sin.shape:
        raise ValueError(f"apply_rotary: cos/sin must be [B, T, D] or [T, D] for x {tuple(x.shape)}, got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    return _dispatch("rms_norm", impl, (x, weight, eps))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    _check_rotary(x, cos, sin)
    return _dispatch("apply_rotary", impl, (x, cos, sin))


def swiglu(up: torch.Tensor, gate: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    if up.shape != gate.shape:
        raise ValueError(f"swiglu: up {tuple(up.shape)} and gate {tuple(gate.shape)} must have one shape")
    return _dispatch("swiglu", impl, (up, gate))
