"""Building the vision side of a VLM from a `VLMConfig` (the LM side: model/backbones.py).

Contract:
- `build_towers(config) -> VisionTower | MultiTower`: one tower, or several concatenated by channel,
  each through `visual.registry.build_tower` with the config's `image_mode` and `dtype`.
"""

from __future__ import annotations

from torch import nn

from model.config import VLMConfig, torch_dtype
from visual.multi import MultiTower
from visual.registry import build_tower


def build_towers(config: VLMConfig) -> nn.Module:
    towers = []
    for spec in config.towers:
        spec = dict(spec)
        if "dtype" in spec:
            raise ValueError(f"VLMConfig.towers: set the dtype with VLMConfig.dtype, not per tower ({spec})")
        towers.append(build_tower(spec.pop("backend"), spec.pop("name_or_path"), image_mode=config.image_mode,
                                  dtype=torch_dtype(config.dtype), **spec))
    return towers[0] if len(towers) == 1 else MultiTower(towers)
