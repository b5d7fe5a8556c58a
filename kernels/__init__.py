"""Attention and fused ops behind one dispatcher each.

* `attention(q, k, v, causal=..., attention_mask=None, cu_seqlens=None, scale=None, impl="auto")`
  (`kernels/attention.py`; impls `auto | torch | eager | triton | cuda`).
* `rms_norm(x, weight, eps, impl="auto")`, `apply_rotary(x, cos, sin, impl="auto")`,
  `swiglu(up, gate, impl="auto")` (`kernels/fused.py`; impls `auto | torch | triton | compile`).

* `kernels.prepare.prepare_attention(device, dtype, head_dim, impl="auto")`: resolves `auto` (the self-test
  on a GPU) once, outside any forward; call it after the model is on its device. Not imported here, so
  `python -m kernels.selftest` runs as a fresh module.

Triton and the CUDA extension are imported lazily; the CUDA extension is built by `prepare_attention` or
`python -m kernels.selftest`, or on first use of an explicit `impl="cuda"`.
"""

from kernels.attention import attention
from kernels.fused import apply_rotary, rms_norm, swiglu

__all__ = ["attention", "rms_norm", "apply_rotary", "swiglu"]
