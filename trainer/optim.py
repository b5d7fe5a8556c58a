"""Optimizer parameter groups: one learning rate per part, no weight decay on biases and norms.

Parts are recognised by the top-level name in the VLM: `projector.*` (and `token_rows.*`, trainable
token embedding rows), `towers.*` and `lm.*` (LoRA adapters live under `lm.` too). Each part is split into a decay and a no-decay group, so the optimizer
has up to six groups; every group carries a `name` so logs and tests can find it.
`param_groups` only builds them; `describe_groups` is the text the Trainer logs once when it makes the
optimizer.
"""

from __future__ import annotations

from torch import nn

from ..model.stages import part_of


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Biases, norm gains and any other 1-D parameter (embedding rows are 2-D and do decay).
    lname = name.lower()
    return p.ndim < 2 or "norm" in lname or ".ln_" in lname or lname.endswith(".bias")


def param_groups(
    model: nn.Module,
    learning_rate: float,
    projector_lr: float | None,
    vision_lr: float,
    weight_decay: float,
) -> list[dict]:
    """Trainable parameters grouped by part and decay, each group with its configured `lr`."""
    lrs = {
        "projector": learning_rate if projector_lr is None else projector_lr,
        "lm": learning_rate,
        "vision": vision_lr,
    }
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part, nd = part_of(name), _no_decay(name, p)
        key = (part, nd)
        if key not in groups:
            groups[key] = {
                "name": f"{part}{'_no_decay' if nd else ''}",
                "params": [],
                "param_names": [],
                "lr": lrs[part],
                "weight_decay": 0.0 if nd else weight_decay,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    if ("vision", False) in groups or ("vision", True) in groups:
        if vision_lr <= 0:
            raise ValueError("vision tower parameters are trainable but vision_lr is 0; set vision_lr > 0")
    return list(groups.values())


def describe_groups(groups: list[dict]) -> str:
    """One line per group: name, learning rate, weight decay, tensors and parameters."""
    return "\n".join(
        f"  {g['name']:<20} lr={g['lr']:.2e} weight_decay={g['weight_decay']:g} tensors={len(g['params'])} "
        f"params={sum(p.numel() for p in g['params']):,}"
        for g in groups
    )
