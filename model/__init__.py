"""The VLM (towers + projector + LM backbone), its registries, building, checkpoints, merge and export.

The names below load on first use (PEP 562): `import model.paths` (finding a model directory) stays
light, so entry points check their arguments before torch and transformers load. Importing any of them
loads model/build.py, which also makes `VLM.from_pretrained` work.
"""

import importlib

_EXPORTS = {
    "build_vlm": "model.build", "load_vlm": "model.build",
    "VLMConfig": "model.config",
    "LM_BACKBONES": "model.model", "PRESETS": "model.model", "VLM": "model.model", "VLMOutput": "model.model",
    "resolve_config": "model.model",
    "build_projector": "model.projector",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    importlib.import_module("model.build")  # registers VLM.from_pretrained's loader
    return getattr(importlib.import_module(_EXPORTS[name]), name)
