"""model/stages.py: one rule for what trains, shared by the optimizer's groups and trainable-only saves."""

from qwenvl_lab.model.stages import part_of, set_trainable
from torch import nn


class _Parts(nn.Module):
    def __init__(self):
        super().__init__()
        for name in ("projector", "token_rows", "towers", "lm", "other"):
            setattr(self, name, nn.Linear(2, 2))


def test_part_of_names_every_part():
    assert part_of("projector.0.weight") == part_of("token_rows.weight") == "projector"
    assert part_of("towers.0.model.stem.conv.weight") == "vision"
    assert part_of("lm.transformer.h.0.attn.c_attn.weight") == part_of("other.weight") == "lm"


def test_set_trainable_follows_the_parts_and_leaves_unknown_names_frozen():
    m = _Parts()
    set_trainable(m, "align")
    on = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert on == {"projector", "token_rows"}
    set_trainable(m, "full", vision_lr=1e-5)
    on = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert on == {"projector", "token_rows", "towers", "lm"}
