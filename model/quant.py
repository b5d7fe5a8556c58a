"""4-bit base weights for QLoRA (bitsandbytes NF4) on a CUDA GPU or, with bitsandbytes' CPU backend, a CPU.

- `quantize_lm_4bit(vlm, compute_dtype=None) -> int` swaps every `nn.Linear` of the LM except the output
  head for a bitsandbytes `Linear4bit` holding the same weights in NF4 with double quantisation (4-bit
  codes, one 8-bit scale per 64 weights, one fp32 scale per 256 scales: ~4.13 bits a weight), quantised on
  the GPU when there is one (the LM moves there) and on the CPU otherwise. Matmuls run in `compute_dtype`
  (default: the weights' own dtype, e.g. bf16 on a GPU, fp32 on a CPU). LoRA adapters go on top
  afterwards (`model.stages.apply_lora`); the 4-bit weights never take gradients. Norms, embeddings and
  the head stay in their dtype.
- Layer widths on a CPU: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for a bf16 kernel
  on its first forward in eval mode without gradients (generation, evaluation), and that packing needs
  `in_features` to be a multiple of 64 (the quantisation block) and `out_features` a multiple of 32 (its
  tile of output rows). The same rule is applied on every CPU (`check_cpu_widths`), so a config that runs
  on an AVX2 machine also runs on an AVX-512 one: quantising for a CPU refuses, before anything is swapped,
  with one UserError line naming the first layer that does not fit, its widths and what to do. Real LMs'
  widths are multiples of 64, so this only bites tiny test models. On a CUDA GPU bitsandbytes' kernels take
  any width and nothing is checked; such a checkpoint loaded on a CPU later meets the same check there.
- Training after an eval forward: bitsandbytes keeps a layer in that bf16 inference layout, whose kernel has
  no backward. A hook on every 4-bit layer takes it back off (and keeps it off) before any forward in
  training mode or with an input that requires grad, so mid-run evaluation leaves training as it was;
  inference-only models keep bitsandbytes' fast path. `dequantize_lm` undoes that layout first as well.
- `has_4bit(module)`: whether any 4-bit layer is inside; `quant_settings(module)` / `QUANT_FILE`: what a
  checkpoint records so that loading quantises the rebuilt LM the same way before the adapters go on.
- `load_4bit_tensors(vlm, tensors)`: a state dict written from a 4-bit LM stores each layer's packed codes
  under `<layer>.weight` and its quantisation state under `<layer>.weight.<part>`; this puts them into the
  (already quantised) layers as they are, bit for bit, and returns the other tensors.
- `dequantize_lm(vlm) -> int` replaces every 4-bit layer by an `nn.Linear` holding its dequantised weights
  (the values the 4-bit layer computes with), keeping LoRA adapters: merging afterwards folds the adapters
  into those weights in float, so the merged model gives the quantised model's logits.
- `base_weight_bytes(module) -> (bytes_4bit, numel)`: memory of the 4-bit layers (codes + every part of
  their quantisation state) and how many weights they hold.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import UserError

QUANT_FILE = "quantization.json"  # in a checkpoint's lora/ directory
QUANT_TYPE = "nf4"


def _bnb():
    try:
        import bitsandbytes as bnb  # optional dependency: only QLoRA needs it
    except ImportError:
        raise UserError("QLoRA needs bitsandbytes: pip install -e '.[qlora]' (or pip install bitsandbytes)") from None
    return bnb


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def has_4bit(module: nn.Module) -> bool:
    return any(_is_4bit(m) for m in module.modules())


def quant_settings(module: nn.Module) -> dict | None:
    """The quantisation a checkpoint records (None when the module has no 4-bit layer)."""
    layer = next((m for m in module.modules() if _is_4bit(m)), None)
    if layer is None:
        return None
    return {"method": "bitsandbytes-4bit", "quant_type": layer.weight.quant_type,
            "double_quant": bool(layer.weight.compress_statistics),
            "compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# bitsandbytes' CPU inference packing (`_convert_weight_packed_for_cpu`) reshapes the per-block scales to
# [out_features, in_features / 64] and tiles the codes in groups of 32 output rows.
CPU_IN_MULTIPLE = 64
CPU_OUT_MULTIPLE = 32


def _targets(lm: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The LM's linear layers that 4-bit quantisation swaps (every nn.Linear but the output head)."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return [(name, m) for name, m in lm.named_modules() if type(m) is nn.Linear and m is not head]


def check_cpu_widths(vlm) -> None:
    """Raise a UserError naming the first LM layer whose widths bitsandbytes' CPU 4-bit paths cannot take."""
    bad = [(name, m) for name, m in _targets(vlm.lm)
           if m.in_features % CPU_IN_MULTIPLE or m.out_features % CPU_OUT_MULTIPLE]
    if not bad:
        return
    name, m = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    raise UserError(
        f"lora.qlora=true on a CPU: LM layer lm.{name} has in_features={m.in_features}, "
        f"out_features={m.out_features}{more}; bitsandbytes' CPU 4-bit kernels need in_features a multiple of "
        f"{CPU_IN_MULTIPLE} and out_features a multiple of {CPU_OUT_MULTIPLE}: choose LM widths "
        f"(hidden_size, intermediate_size, heads x head_dim) that are multiples of 64, or set lora.qlora=false")


def _trainable_layout(layer: nn.Module, args: tuple) -> None:
    """Before a forward that may need gradients (training mode, or an input that requires grad): keep the
    layer off bitsandbytes' CPU inference layout for good, and undo that layout if an earlier eval forward
    made it. That layout's bf16 kernel has no backward (a training step after a mid-run evaluation failed,
    or passed no gradient to the layer's input), and making it rounds the block scales to bf16."""
    if not (layer.training or (args and isinstance(args[0], torch.Tensor) and args[0].requires_grad)):
        return  # inference: bitsandbytes may use its packed bf16 kernel (AVX512-BF16 CPUs)
    layer.support_avx512bf16_for_cpu = False  # the flag bitsandbytes' forward reads before repacking
    _undo_cpu_layout(layer)


def _undo_cpu_layout(layer: nn.Module) -> None:
    """Put a layer that bitsandbytes repacked for its CPU inference kernel back into the ordinary 4-bit
    layout (codes + quantisation state), which training, dequantising and saving read."""
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' own inverse (it calls it before saving or moving a repacked layer): best effort,
        # the block scales keep their bf16 rounding.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
        layer.quant_state = layer.weight.quant_state


def quantize_lm_4bit(vlm, compute_dtype: torch.dtype | None = None, quant_type: str = QUANT_TYPE,
                     double_quant: bool = True) -> int:
    """Quantise the LM's linear layers in place (head excepted); returns how many were swapped.
    On a CPU, every layer's widths are checked first (`check_cpu_widths`)."""
    device = _device()
    if device.type == "cpu":
        check_cpu_widths(vlm)  # before bitsandbytes loads: the rule holds whether or not it is installed
    bnb = _bnb()
    targets = {id(m) for _, m in _targets(vlm.lm)}
    swapped = 0
    for module in list(vlm.lm.modules()):
        for child_name, child in list(module.named_children()):
            if id(child) not in targets:
                continue
            dtype = compute_dtype or child.weight.dtype
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=dtype, compress_statistics=double_quant, quant_type=quant_type,
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant_type, module=q)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            q.to(device)  # bitsandbytes quantises a Params4bit when it is moved to a device
            q.register_forward_pre_hook(_trainable_layout)
            setattr(module, child_name, q)
            swapped += 1
    if swapped == 0:
        raise ValueError("QLoRA: the LM has no nn.Linear layer to quantise")
    vlm.lm.to(device)
    return swapped


def load_4bit_tensors(vlm, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put stored 4-bit codes and their quantisation state into the VLM's 4-bit layers; returns the rest."""
    bnb = _bnb()
    rest = dict(tensors)
    for name, module in vlm.named_modules():
        if not _is_4bit(module):
            continue
        key = f"{name}.weight"
        if key not in rest:
            continue
        stats = {k[len(key) + 1:]: rest.pop(k) for k in [k for k in rest if k.startswith(key + ".")]}
        if not stats:
            raise ValueError(f"{key}: 4-bit codes without their quantisation state (a checkpoint from an "
                             f"unquantised model loaded into a QLoRA one?)")
        device = module.weight.device
        module.weight = bnb.nn.Params4bit.from_prequantized(rest.pop(key), stats, requires_grad=False,
                                                            device=device, module=module)
    return rest


def dequantize_lm(vlm) -> int:
    """Replace every 4-bit layer of the LM by an `nn.Linear` with its dequantised weights; LoRA adapters stay."""
    # peft is heavy (it loads bitsandbytes and parts of inductor): imported only when merging a QLoRA run.
    from peft import PeftModel, get_peft_model

    bnb = _bnb()
    lm = vlm.lm
    adapters = None
    if isinstance(lm, PeftModel):
        # peft's 4-bit LoRA layer would re-quantise on merge: take the adapters off, dequantise the base,
        # put the same adapters (config and weights) back on plain Linear layers.
        if list(lm.peft_config) != ["default"]:
            raise ValueError(f"dequantize: only one LoRA adapter named 'default' is supported, got {list(lm.peft_config)}")
        adapters = (lm.peft_config["default"], {k: v.detach().clone() for k, v in lm.state_dict().items()
                                                if "lora_" in k})
        lm = lm.unload()
    replaced = 0
    for module in list(lm.modules()):
        for child_name, child in list(module.named_children()):
            if not _is_4bit(child):
                continue
            _undo_cpu_layout(child)  # a layer that ran an eval forward on an AVX512-BF16 CPU
            state = child.weight.quant_state
            weight = bnb.functional.dequantize_4bit(child.weight.data, state)  # [out, in], the original dtype
            dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                              device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if child.bias is not None:
                    dense.bias.copy_(child.bias.to(weight.dtype))
            dense.requires_grad_(False)
            setattr(module, child_name, dense)
            replaced += 1
    if adapters is not None:
        config, lora_state = adapters
        lm = get_peft_model(lm, config)
        missing = lm.load_state_dict(lora_state, strict=False).missing_keys
        lost = [k for k in missing if "lora_" in k]
        if lost:
            raise RuntimeError(f"dequantize: {len(lost)} LoRA tensors did not find their layer, e.g. {lost[:3]}")
    vlm.lm = lm
    return replaced


def base_weight_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes held by the 4-bit layers' weights incl. all quantisation state, number of weights they hold)."""
    nbytes, numel = 0, 0
    for m in module.modules():
        if not _is_4bit(m):
            continue
        state = m.weight.quant_state
        held = [m.weight.data, state.absmax, state.code]  # codes, per-block scales, the NF4 table
        if state.nested:  # double quantisation: the scales' own scales, table and offset
            held += [state.state2.absmax, state.state2.code, state.offset]
        nbytes += sum(t.numel() * t.element_size() for t in held)
        numel += m.in_features * m.out_features
    return nbytes, numel
