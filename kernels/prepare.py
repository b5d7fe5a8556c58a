"""Resolve the attention implementation once, outside any forward.

`prepare_attention(device, dtype, head_dim, impl="auto") -> str` is called after a model is on its device
and before its first training step or generate (`VLM.prepare_attention` calls it for the model's LM). For
`auto` on a GPU it runs the kernels' self-test (`kernels.selftest.verify`: forward AND backward of every
candidate against an fp32 reference, then a micro-benchmark against SDPA) and stores the choice where
`kernels.attention`'s dispatcher reads it; explicit impls load (or build) their kernel here, with the
fallback to SDPA logged once. The returned name is what the model's attention calls will run; the choice
and its reason are logged once. Nothing here runs inside a forward, a checkpointed region or a compiled
graph: the self-test's own backward would break non-reentrant gradient checkpointing (CheckpointError) and
a graph break in a compiled region.
"""

from __future__ import annotations

import torch

from . import attention as A
from . import selftest


def prepare_attention(device: torch.device | str, dtype: torch.dtype, head_dim: int, impl: str = "auto") -> str:
    device = torch.device(device)
    if impl == "auto" and A._is_gpu(device) and not A.auto_unsupported(dtype, head_dim):
        key = A.verified_key(device, dtype, head_dim)
        if key not in A.VERIFIED:
            # Its own graph: grad on and no autocast, whatever the caller runs under (generate: no_grad).
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                A.VERIFIED[key] = selftest.verify(device, dtype, head_dim)
    return A._resolve(impl, device, dtype, head_dim)
