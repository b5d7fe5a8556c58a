"""The VLM (towers + projector + LM backbone), its registries, building, checkpoints, merge and export.

The names below load on first use (PEP 562): `import qwenvl_lab.model.paths` (finding a model directory) stays
light, so entry points check their arguments before torch and transformers load.
"""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m model...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)

import importlib

_EXPORTS = {
    "VLMConfig": ".config",
    "LM_BACKBONES": ".model", "PRESETS": ".model", "VLM": ".model", "VLMOutput": ".model",
    "build_vlm": ".model", "load_vlm": ".model", "resolve_config": ".model",
    "build_projector": ".projector",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
