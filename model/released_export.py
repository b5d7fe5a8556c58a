"""A trained run of a released wrapper family (model/released.py) as a PEFT adapter for its released base.

`export_released_peft(vlm, dst) -> (dst, modules_to_save)`: the run's LoRA, unmerged, plus every other tensor
it trained (the merger, i.e. the projector; an unfrozen tower's layers) as peft's `modules_to_save`, written by
peft itself from a peft model built on the meta device over the base's config.json (no base weights read), so

    PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(BASE), DST)

gives the run's logits. `modules_to_save` names the leaf modules holding the trained tensors (peft keeps a
whole module: an untouched bias beside a trained weight is saved at its base value, the same function). A
run without LoRA, or a trained tensor inside a module LoRA adapts (peft cannot hold both), is a ValueError
naming it (export.py turns it into one line).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from .released import ReleasedVLM


def _modules_to_save(vlm: ReleasedVLM, adapted: set[str]) -> list[str]:
    """The leaf modules (transformers names) of the run's trained non-LoRA tensors."""
    modules = sorted({name.rsplit(".", 1)[0] for name in vlm.trained_tensors})
    clash = [m for m in modules if m in adapted]
    if clash:
        raise ValueError(f"PEFT adapter export: {clash[0]} has both a LoRA adapter and trained base weights; "
                         "peft cannot hold both: merge instead (python -m qwenvl_lab.model.merge)")
    return modules


def export_released_peft(vlm: ReleasedVLM, dst: str | Path) -> tuple[Path, list[str]]:
    from peft import get_peft_model  # peft only where adapters are

    if not hasattr(vlm.model, "peft_config"):
        raise ValueError("PEFT adapter export needs a run trained with LoRA (stage=sft, lora.r > 0); a run "
                         "without adapters merges to the released layout instead (python -m qwenvl_lab.model.merge)")
    lora = vlm.model.peft_config["default"]
    prefix = "base_model.model."
    tensors = {n: p.detach().float().clone() for n, p in vlm.model.named_parameters() if "lora_" in n}
    adapted = {n.removeprefix(prefix).split(".lora_")[0] for n in tensors}
    modules = _modules_to_save(vlm, adapted)
    hf_state = vlm._hf().state_dict()
    for module in modules:
        for key, value in hf_state.items():
            if key.startswith(module + ".") and "." not in key[len(module) + 1:]:
                tensors[f"{prefix}{module}.modules_to_save.default.{key[len(module) + 1:]}"] = value.detach().float().clone()
    config = dataclasses.replace(lora, modules_to_save=modules or None, base_model_name_or_path=str(vlm.source))
    with torch.device("meta"):
        base = getattr(transformers, vlm.family.hf_class)(AutoConfig.from_pretrained(str(vlm.source)))
    base.name_or_path = str(vlm.source)  # what peft writes as base_model_name_or_path
    peft_model = get_peft_model(base, config)
    missing = set(tensors) - set(peft_model.state_dict())
    assert not missing, f"names the released peft model lacks: {sorted(missing)[:4]}"
    peft_model.load_state_dict(tensors, strict=False, assign=True)
    peft_model.save_pretrained(str(dst))
    return Path(dst), modules
