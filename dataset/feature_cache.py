"""A cache of frozen vision-tower outputs, so stage 1 never decodes an image nor runs the tower.

Layout of a cache directory (written by `python -m qwenvl_lab.dataprocess.cache_features`):
  features-00000.safetensors, ...   shards; tensor `"<k>"` = one image's tower output `[T, C]`
  feature_cache.json                the index, written last: `{"format": 1, "identity": {...},
                                    "num_tokens": T, "hidden_size": C, "dtype": "float32",
                                    "images": {resolved_path: [shard_file, key]}}`
Keys are `image_key(path)` (the real absolute path), the same strings the dataset derives from its
records, so one cache serves any data file naming the same images.

* `tower_identity(towers, tower_specs, image_mode) -> dict`: what must match for cached features to
  stand for the tower: per tower backend / feature_layer / select, the image mode and size, the token
  count and width, and `fingerprint` (sha256 over a strided sample of every tower weight, rounded to
  bf16 so an fp32 tower and its bf16 copy agree). The duck-typed `towers` is `VLM.towers`.
* `FeatureCache(dir)`: `in`, `get(path) -> FloatTensor [T, C]` (KeyError when absent),
  `check(identity)` raises `FeatureCacheMismatch` naming every differing field (a cache written for
  another tower is refused, never silently used). Shards are opened lazily per process, so the object
  pickles into DataLoader workers.
* `refuse_variable_resolution(resolution)`: a variable resolution mode (anyres, native, naflex) raises
  `FeatureCacheUnsupported` (a UserError naming `feature_cache`): each image has its own crops and count.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.errors import UserError

INDEX_FILE = "feature_cache.json"
FORMAT = 1
# Identity fields compared by `check` (the specs' name_or_path is informational: the fingerprint decides).
COMPARED = ("towers", "image_mode", "image_size", "num_tokens", "hidden_size", "fingerprint")


class FeatureCacheMismatch(ValueError):
    """The cache was written for a different tower (or is not a cache)."""


def image_key(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def weights_fingerprint(module: torch.nn.Module, per_tensor: int = 4096) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        if flat.is_floating_point():
            stride = max(1, flat.numel() // per_tensor)
            # bf16 rounding: the fingerprint survives a cast of the tower to tower_dtype=bfloat16.
            sample = flat[::stride][:per_tensor].float().to(torch.bfloat16).float().cpu()
        else:
            sample = flat[:per_tensor].cpu().double()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def tower_identity(towers: torch.nn.Module, tower_specs: list[dict], image_mode: str) -> dict:
    keep = ("backend", "feature_layer", "select")
    return {
        # last_hidden_state (the BigBro features) only when set, so caches written before it still match
        "towers": [{k: spec.get(k) for k in keep} | ({"last_hidden_state": True} if spec.get("last_hidden_state")
                                                     else {}) for spec in tower_specs],
        "tower_specs": [dict(spec) for spec in tower_specs],  # informational
        "image_mode": image_mode,
        "image_size": int(towers.image_size),
        "num_tokens": int(towers.num_tokens),
        "hidden_size": int(towers.hidden_size),
        "fingerprint": weights_fingerprint(towers),
    }


class FeatureCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index = self.root / INDEX_FILE
        if not index.is_file():
            raise FeatureCacheMismatch(f"feature cache {self.root}: no {INDEX_FILE} (write one with "
                                       f"`python -m qwenvl_lab.dataprocess.cache_features`, or it did not finish)")
        meta = json.loads(index.read_text())
        if meta.get("format") != FORMAT:
            raise FeatureCacheMismatch(f"feature cache {index}: format {meta.get('format')!r}, expected {FORMAT}")
        self.identity: dict = meta["identity"]
        self.num_tokens, self.hidden_size = int(meta["num_tokens"]), int(meta["hidden_size"])
        self.images: dict[str, list] = meta["images"]
        self._shards: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __contains__(self, path) -> bool:
        return image_key(path) in self.images

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_shards"] = {}  # open safetensors handles stay in the process that opened them
        return state

    def get(self, path) -> torch.Tensor:
        """The tower output `[num_tokens, hidden_size]` of one image (KeyError when not cached)."""
        shard, key = self.images[image_key(path)]
        handle = self._shards.get(shard)
        if handle is None:
            handle = self._shards[shard] = safe_open(str(self.root / shard), framework="pt")
        t = handle.get_tensor(key)
        if tuple(t.shape) != (self.num_tokens, self.hidden_size):
            raise FeatureCacheMismatch(f"feature cache {self.root}/{shard}[{key}] ({path}): shape {tuple(t.shape)}, "
                                       f"index says [{self.num_tokens}, {self.hidden_size}]")
        return t

    def check(self, identity: dict) -> None:
        """Raise when this cache was not written by a tower with `identity` (see `tower_identity`)."""
        diff = [k for k in COMPARED if self.identity.get(k) != identity.get(k)]
        if diff:
            details = "; ".join(f"{k}: cache {self.identity.get(k)!r} vs model {identity.get(k)!r}" for k in diff)
            raise FeatureCacheMismatch(f"feature cache {self.root} was written for another vision tower "
                                       f"({details}); rebuild it with `python -m qwenvl_lab.dataprocess.cache_features`")


class FeatureCacheUnsupported(UserError, ValueError):
    """A feature cache cannot stand for the towers' input under this model's resolution mode."""


def refuse_variable_resolution(resolution) -> None:
    """A variable resolution mode (`resolution.variable`: anyres, native, naflex) gives each image its own
    crops and token count, and the towers see a different input whenever an image is downscaled to a
    budget; a cache holds one fixed [T, C] output per image, so it is refused (one line naming the key)."""
    if resolution is not None and getattr(resolution, "variable", False):
        raise FeatureCacheUnsupported(
            f"feature_cache: the model's resolution mode {resolution.mode!r} gives each image its own number of "
            f"crops and tokens, which a cache of one fixed-size tower output per image cannot hold; remove "
            f"feature_cache (or use the fixed resolution mode)")
