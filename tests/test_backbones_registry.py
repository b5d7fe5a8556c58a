"""The two backbone interfaces are abstract base classes, and each has one registry of concrete classes.

- `visual.base.VisionTower` requires `_hidden_state`; `visual.registry.BACKENDS` names every tower backend.
- `model.backbones.LMBackbone` requires `load_lm`, `hidden_states`, `generate`; `model.model.LM_BACKBONES`
  names every LM family.
A class missing a required method cannot be instantiated, and every registry entry is a concrete subclass whose
own name is its key.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from qwenvl_lab.model.backbones import LMBackbone
from qwenvl_lab.model.model import LM_BACKBONES
from qwenvl_lab.visual.base import VisionTower
from qwenvl_lab.visual.processor import ImageProcessor
from qwenvl_lab.visual.registry import BACKENDS


def test_vision_tower_requires_hidden_state():
    assert inspect.isabstract(VisionTower)
    assert VisionTower.__abstractmethods__ == frozenset({"_hidden_state"})

    class NoFeatures(VisionTower):
        backend = "none"

    facts = dict(name="t", hidden_size=4, grid=(2, 2), has_cls=False, num_prefix=0, feature_layer=0,
                 select="patch", processor=ImageProcessor(size=8, mean=(0.5,) * 3, std=(0.5,) * 3))
    with pytest.raises(TypeError, match="_hidden_state"):
        NoFeatures(**facts)

    class Ones(NoFeatures):
        def _hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return torch.ones(pixel_values.shape[0], 4, 4) * self.scale  # [N, h*w, D]

        def __init__(self) -> None:
            super().__init__(**facts)
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

    out = Ones()(torch.zeros(3, 3, 8, 8))  # the base's checks and selection run around the subclass's features
    assert out.shape == (3, 4, 4) and torch.all(out == 2.0)


def test_lm_backbone_requires_load_hidden_states_generate():
    assert inspect.isabstract(LMBackbone)
    assert LMBackbone.__abstractmethods__ == frozenset({"load_lm", "hidden_states", "generate"})

    class Partial(LMBackbone):
        name = "partial"

        @classmethod
        def load_lm(cls, config):
            return torch.nn.Linear(1, 1)

    with pytest.raises(TypeError, match="generate.*hidden_states|hidden_states.*generate"):
        Partial(None, None, None)


@pytest.mark.parametrize(("registry", "base", "key_attr"), [
    (BACKENDS, VisionTower, "backend"),
    (LM_BACKBONES, LMBackbone, "name"),
])
def test_registry_entries_are_concrete_and_named_by_their_key(registry, base, key_attr):
    assert registry, "an empty registry"
    for key, cls in registry.items():
        assert issubclass(cls, base), f"{key}: {cls.__name__} is not a {base.__name__}"
        assert not inspect.isabstract(cls), f"{key}: {cls.__name__} lacks {sorted(cls.__abstractmethods__)}"
        assert getattr(cls, key_attr) == key, f"{key}: {cls.__name__}.{key_attr} = {getattr(cls, key_attr)!r}"
