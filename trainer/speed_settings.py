"""The run's speed settings, applied once the model is built (`trainer/run.py`).

Contract: `apply_speed_settings(cfg, vlm)`
* `retain_freed_memory` (default true): on a CPU run, glibc keeps freed memory for reuse
  (`trainer/cpu_malloc.py`; large tensors then stop paying page faults); nothing on a GPU.
* `fused_impl` (default `keep`: the model's own, `torch`): the qwen LM's RMSNorm / rotary / SwiGLU
  implementation (`kernels.fused`: auto | torch | triton | compile).
* `compile_lm` (default false): the qwen LM's decoder blocks through `torch.compile`
  (`QWenLMHeadModel.compile_blocks`; falls back to eager with a warning when compiling fails).
Both LM keys need `model.lm_backend=qwen`; another LM gets a one-line ConfigError.
Returns what was applied, for the log.
"""

from __future__ import annotations

import logging

import torch

from ..core.config_io import ConfigError
from ..qwen import QWenLMHeadModel
from .cpu_malloc import retain_freed_memory

log = logging.getLogger(__name__)


def _qwen_lm(vlm):
    return next((m for m in vlm.modules() if isinstance(m, QWenLMHeadModel)), None)


def apply_speed_settings(cfg, vlm) -> dict:
    done = {}
    if cfg.retain_freed_memory and not torch.cuda.is_available():
        done["retain_freed_memory"] = retain_freed_memory(True)
    if cfg.fused_impl != "keep" or cfg.compile_lm:
        lm = _qwen_lm(vlm)
        if lm is None:
            raise ConfigError("fused_impl / compile_lm apply to the qwen LM (model.lm_backend=qwen); this LM is "
                              f"{vlm.config.lm_backend!r}: leave them at their defaults")
        if cfg.fused_impl != "keep":
            try:
                lm.set_fused_impl(cfg.fused_impl)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            done["fused_impl"] = cfg.fused_impl
        if cfg.compile_lm:
            done["compile_lm"] = lm.compile_blocks()
    if done:
        log.info("speed settings: %s", done)
    return done
