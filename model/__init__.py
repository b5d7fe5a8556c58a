"""The VLM (towers + projector + LM backbone), its registries, building, checkpoints, merge and export."""

from model.build import build_vlm, load_vlm
from model.config import VLMConfig
from model.model import LM_BACKBONES, PRESETS, VLM, VLMOutput, resolve_config
from model.projector import build_projector

__all__ = ["LM_BACKBONES", "PRESETS", "VLM", "VLMConfig", "VLMOutput", "build_projector", "build_vlm", "load_vlm",
           "resolve_config"]
