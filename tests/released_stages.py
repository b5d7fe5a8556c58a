"""What each stage trains in a released wrapper model, shared by the family test files.

`STAGE_CASES`: (stage, vision_lr, {part: {"base" | "lora"}}) as `model.stages.set_trainable` must leave it;
`trainable_parts(model)`: the same map read from a model's trainable parameters (`model.stages.part_of`).
"""

from __future__ import annotations

STAGE_CASES = [
    ("align", 0.0, {"projector": {"base"}}),
    ("sft", 0.0, {"projector": {"base"}, "lm": {"lora"}}),
    ("sft", 1e-4, {"projector": {"base"}, "lm": {"lora"}, "vision": {"base"}}),
    ("full", 0.0, {"projector": {"base"}, "lm": {"base"}}),
]


def trainable_parts(model) -> dict[str, set[str]]:
    from qwenvl_lab.model.stages import part_of

    out: dict[str, set[str]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out.setdefault(part_of(n), set()).add("lora" if "lora_" in n else "base")
    return out
