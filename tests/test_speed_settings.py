"""trainer/speed.py applies the run's speed keys; trainer/cpu_malloc.py switches glibc's allocator."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from trainer.config import TrainConfig
from trainer.config_io import ConfigError
from trainer.speed import apply_speed_settings


def _vlm(tmp_path, backend="qwen"):
    from model import build_vlm
    from tests.tiny_visual import save_tiny_clip

    tower = save_tiny_clip(tmp_path / "clip", image_size=32, patch_size=8, hidden=32, layers=1)
    lm_config = ({"arch": "qwen2", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
                  "max_position_embeddings": 128} if backend == "qwen" else
                 {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48})
    return build_vlm({"lm": "scratch", "lm_backend": backend, "lm_config": lm_config, "image_token_id": 100,
                      "towers": [{"backend": "hf_clip", "name_or_path": str(tower), "feature_layer": -2,
                                  "select": "patch"}], "image_mode": "resize"})


def _cfg(**kw):
    base = {k: getattr(TrainConfig, k) for k in ("retain_freed_memory", "fused_impl", "compile_lm")}
    return SimpleNamespace(**{**base, **kw})


def test_defaults_and_fused_impl(tmp_path):
    vlm = _vlm(tmp_path)
    done = apply_speed_settings(_cfg(), vlm)
    assert set(done) <= {"retain_freed_memory"}  # the LM keys are opt-in
    assert vlm.lm.config.fused_impl == "torch"  # the model's default until fused kernels are measured on a GPU
    done = apply_speed_settings(_cfg(fused_impl="compile", retain_freed_memory=False), vlm)
    assert done == {"fused_impl": "compile"}
    assert vlm.lm.config.fused_impl == "compile" and vlm.lm.transformer.ln_f.impl == "compile"
    with pytest.raises(ConfigError, match="fused_impl"):
        apply_speed_settings(_cfg(fused_impl="fastest", retain_freed_memory=False), vlm)


def test_lm_keys_need_the_qwen_lm(tmp_path):
    vlm = _vlm(tmp_path, backend="hf")
    with pytest.raises(ConfigError, match="lm_backend=qwen"):
        apply_speed_settings(_cfg(compile_lm=True, retain_freed_memory=False), vlm)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_retain_freed_memory_round_trip():
    from trainer.cpu_malloc import retain_freed_memory

    try:
        assert retain_freed_memory(True)
        x = torch.ones(1 << 20)  # 4 MB: served from the heap now, and still correct
        assert float(x.sum()) == float(1 << 20)
    finally:
        assert retain_freed_memory(False)
