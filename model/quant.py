"""4-bit base weights for QLoRA (bitsandbytes NF4; needs a CUDA GPU).

`quantize_lm_4bit(vlm)` swaps every `nn.Linear` of the LM except the output head for a bitsandbytes
`Linear4bit` (NF4, double quantisation, bf16 compute) holding the same weights, then moves the LM to the GPU,
which is where bitsandbytes quantises. LoRA adapters are added on top afterwards (`trainer.stages.apply_lora`);
the frozen 4-bit weights never take gradients. Norms and embeddings stay in their dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_lm_4bit(vlm, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Quantise the LM's linear layers in place; returns how many were swapped."""
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA (4-bit base weights) needs a CUDA GPU; none is present")
    import bitsandbytes as bnb

    head = vlm.lm.get_output_embeddings() if hasattr(vlm.lm, "get_output_embeddings") else None
    swapped = 0
    for module in list(vlm.lm.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.float16).cpu(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(module, child_name, q)
            swapped += 1
    vlm.lm.cuda()  # bitsandbytes quantises the Params4bit on their move to the GPU
    return swapped
