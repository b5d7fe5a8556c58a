"""The VLM (towers + projector + LM), its registry of presets, projectors and checkpoints."""

from model.config import PRESETS, VLMConfig, resolve_config
from model.model import VLM, VLMOutput, build_vlm
from model.projector import build_projector

__all__ = ["PRESETS", "VLM", "VLMConfig", "VLMOutput", "build_projector", "build_vlm", "resolve_config"]
