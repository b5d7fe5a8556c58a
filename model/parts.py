"""Building the vision side of a VLM from a `VLMConfig` (the LM side: model/backbones.py), and the one
answer to a name that cannot be loaded.

Contract:
- `build_towers(config) -> VisionTower | MultiTower`: one tower, or several concatenated by channel,
  each through `visual.registry.build_tower` with the config's `image_mode` and `dtype`.
- `named_source(name, what)`: a context manager around loading `name` (a hub id or a local path the user
  gave). A local path that does not exist, or a hub id that cannot be fetched (offline, unreachable,
  misspelt), becomes one `UserError` saying so and how to point at a local directory. Errors while loading
  an existing local directory are left alone (they are bugs or damaged files, with their traceback).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..core.errors import UserError
from ..visual.multi import MultiTower
from ..visual.registry import build_tower
from .config import VLMConfig
from .dtypes import torch_dtype

_HUB_HINTS = ("hub", "huggingface", "connect", "offline", "cached", "repo id")


@contextmanager
def named_source(name: str, what: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, RuntimeError) as e:
        if Path(os.path.expanduser(name)).exists():
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if name.startswith(("/", "./", "../", "~")):
            raise UserError(f"{what} {name}: no such directory") from None
        if not (isinstance(e, OSError) or any(h in str(e).lower() for h in _HUB_HINTS)):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "the hub is off (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else \
            "it is neither a local directory nor fetchable from the hub (unreachable, or a wrong name)"
        repo = name.removeprefix("hf-hub:")
        raise UserError(f"{what} {name!r}: {why} ({first}). Download it where the hub is reachable "
                        f"(`hf download {repo} --local-dir DIR`) and give DIR instead") from None


def build_towers(config: VLMConfig) -> nn.Module:
    towers = []
    for i, spec in enumerate(config.towers):
        spec = dict(spec)
        if "dtype" in spec:
            raise ValueError(f"VLMConfig.towers: set the dtype with VLMConfig.dtype, not per tower ({spec})")
        name = str(spec["name_or_path"])
        with named_source(name, f"vision tower {i} (towers[{i}].name_or_path)"):
            towers.append(build_tower(spec.pop("backend"), spec.pop("name_or_path"), image_mode=config.image_mode,
                                      dtype=torch_dtype(config.dtype), **spec))
    return towers[0] if len(towers) == 1 else MultiTower(towers)
