"""Attention and fused ops behind one dispatcher (see `kernels.attention`)."""

from kernels.attention import attention

__all__ = ["attention"]
