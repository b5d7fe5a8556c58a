"""Attention and fused ops behind one dispatcher each.

* `attention(q, k, v, causal=..., attention_mask=None, cu_seqlens=None, scale=None, impl="auto")`
  (`kernels/attention.py`; impls `auto | torch | eager | triton | cuda`).
* `rms_norm(x, weight, eps, impl="auto")`, `apply_rotary(x, cos, sin, impl="auto")`,
  `swiglu(up, gate, impl="auto")` (`kernels/fused.py`; impls `auto | torch | triton | compile`).

Triton and the CUDA extension are imported/built lazily, on first use.
"""

from kernels.attention import attention
from kernels.fused import apply_rotary, rms_norm, swiglu

__all__ = ["attention", "rms_norm", "apply_rotary", "swiglu"]
