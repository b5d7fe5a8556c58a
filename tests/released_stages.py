"""Checks shared by the released-family test files: what each stage trains, greedy parity, the first Adam step.

`STAGE_CASES`: (stage, vision_lr, {part: {"base" | "lora"}}) as `model.stages.set_trainable` must leave it;
`trainable_parts(model)`: the same map read from a model's trainable parameters (`model.stages.part_of`);
`generate_reply(model, ref, n)`: transformers' greedy answer on the processor's inputs; `assert_first_adam_step`.
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


def generate_reply(model, ref: dict, max_new_tokens: int) -> str:
    """transformers' own greedy `generate` of a wrapper model on the processor's inputs `ref`, cut before the
    first stop id and decoded: what `model.chat` must answer."""
    out = model.model.generate(**ref, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=model.stop_token_ids, pad_token_id=model.pad_token_id)
    new = out[0, ref["input_ids"].shape[1]:].tolist()
    cut = new[: next((i for i, t in enumerate(new) if t in model.stop_token_ids), len(new))]
    assert cut, "transformers' generate stopped at once: the comparison would be empty"
    return model.processor.tokenizer.decode(cut, skip_special_tokens=True)


def assert_first_adam_step(groups: list[dict], model, before: dict) -> None:
    """After one AdamW step from `before`: every entry of a group that got a gradient moved by exactly the
    group's lr, and every frozen parameter (tower, base LM) is bit-identical."""
    import torch

    for group in groups:
        for n, p in zip(group["param_names"], group["params"]):
            step = (p.detach() - before[n]).abs()
            moved = step[step > 0]  # Adam's first step moves every entry with a gradient by exactly lr
            assert moved.numel() > 0 and torch.allclose(moved, torch.full_like(moved, group["lr"]), rtol=1e-3), n
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n
