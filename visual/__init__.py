"""Vision towers behind one interface (see visual/base.py) and the backend registry."""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m visual...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)

from .base import VisionTower
from .multi import MultiTower
from .processor import ImageProcessor
from .registry import BACKENDS, build_tower

__all__ = ["BACKENDS", "ImageProcessor", "MultiTower", "VisionTower", "build_tower"]
