"""Vision towers behind one interface (see visual/base.py) and the backend registry."""

from visual.base import VisionTower
from visual.multi import MultiTower
from visual.processor import ImageProcessor
from visual.registry import BACKENDS, build_tower

__all__ = ["BACKENDS", "ImageProcessor", "MultiTower", "VisionTower", "build_tower"]
