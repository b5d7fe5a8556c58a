"""Tiny VLMs for tests and the entry points: every part saved in its native format, loaded by path.

`build_tiny_vlm(tmp_path, tower="clip", n_towers=1, lm_arch="qwen2", lm_backend="qwen", **overrides) -> VLM`
- `tower`: "clip" | "siglip" | "open_clip" | "timm_vit" | "timm_cnn" (tiny_visual builders); with
  n_towers > 1 the towers are that kind plus SigLIP / CLIP alternately (patch tokens only).
- `lm_arch`: "qwen1" | "qwen2" | "qwen3" (tiny_qwen checkpoints, with their tokenizer files);
  `lm_backend="hf"` loads the same qwen2/qwen3 directory through transformers (the generic LM path).
- `overrides` are VLMConfig fields (projector, reduce, reduce_factor, freeze_towers, ...).
"""

from __future__ import annotations

from pathlib import Path

from qwenvl_lab.model import VLM, build_vlm

from tests.tiny_qwen import write_tiny_qwen_checkpoint
from tests.tiny_visual import (
    save_tiny_clip,
    save_tiny_open_clip,
    save_tiny_siglip,
    save_tiny_timm_cnn,
    save_tiny_timm_vit,
)

# tower kind -> (saver, backend, feature_layer)
TINY_TOWERS = {
    "clip": (save_tiny_clip, "hf_clip", -2),
    "siglip": (save_tiny_siglip, "hf_siglip", -2),
    "open_clip": (save_tiny_open_clip, "open_clip", -2),
    "timm_vit": (save_tiny_timm_vit, "timm", -2),
    "timm_cnn": (save_tiny_timm_cnn, "timm", -1),
}


def tiny_tower_spec(tmp_path: Path, kind: str, index: int = 0) -> dict:
    if kind not in TINY_TOWERS:
        raise ValueError(f"unknown tiny tower {kind!r}; valid: {sorted(TINY_TOWERS)}")
    saver, backend, layer = TINY_TOWERS[kind]
    path = Path(tmp_path) / f"tower{index}_{kind}"
    if not path.exists():
        saver(path)
    return {"backend": backend, "name_or_path": str(path), "feature_layer": layer, "select": "patch"}


def tiny_lm_dir(tmp_path: Path, arch: str = "qwen2", seed: int = 0) -> Path:
    path = Path(tmp_path) / f"lm_{arch}_{seed}"
    if not path.exists():
        write_tiny_qwen_checkpoint(path, arch=arch, seed=seed)
    return path


def build_tiny_vlm(
    tmp_path: Path,
    tower: str = "clip",
    n_towers: int = 1,
    lm_arch: str = "qwen2",
    lm_backend: str = "qwen",
    **overrides,
) -> VLM:
    kinds = [tower] + [("siglip" if tower != "siglip" else "clip") for _ in range(n_towers - 1)]
    towers = [tiny_tower_spec(tmp_path, k, i) for i, k in enumerate(kinds)]
    cfg = dict(lm=str(tiny_lm_dir(tmp_path, lm_arch)), lm_backend=lm_backend, towers=towers, image_mode="resize")
    cfg.update(overrides)
    return build_vlm(cfg)


def randomize_(model, seed: int = 0) -> None:
    """Non-trivial weights everywhere (norms around 1), so a dropped or swapped tensor changes logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def save_tiny_llava(
    path: Path,
    vision: str = "clip",
    text: str = "qwen2",
    strategy: str = "default",
    feature_layer: int = -2,
    image_token_index: int = 100,
    seed: int = 0,
) -> Path:
    """A random tiny transformers LlavaForConditionalGeneration saved with save_pretrained.
    Vision 32 px / patch 8 (16 patches, +CLS for CLIP), hidden 32; LM hidden 64, vocab 128."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vkw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8)
    vc = CLIPVisionConfig(**vkw) if vision == "clip" else SiglipVisionConfig(**vkw)
    tkw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
    tc = Qwen2Config(**tkw) if text == "qwen2" else LlamaConfig(**tkw)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_token_index,
                      vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer)
    model = LlavaForConditionalGeneration(cfg)
    randomize_(model, seed)
    model.save_pretrained(str(path))
    return Path(path)


def tiny_llama_dir(tmp_path: Path, seed: int = 0) -> Path:
    """A random tiny transformers LlamaForCausalLM directory (vocab 128, hidden 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(tmp_path) / f"llama_{seed}"
    if not path.exists():
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
        randomize_(model, seed)
        model.save_pretrained(str(path))
    return path
