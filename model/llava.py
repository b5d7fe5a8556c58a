"""Import a transformers `LlavaForConditionalGeneration` directory into our parts, logits unchanged.

`llava_parts(path, config=None) -> (VLMConfig, tower, projector, lm, tokenizer, dtype)`: what `VLM(...)`
is assembled from, then cast to `dtype` (model/model.py does both: this module sits below it):
- vision tower (CLIP or SigLIP) -> our `hf_clip` / `hf_siglip` tower, with `vision_feature_layer` as
  `feature_layer` and `vision_feature_select_strategy` as `select` ("default" drops CLIP's CLS ->
  "patch"; "full" keeps it -> "cls_patch"; a SigLIP tower has no CLS, so only "full" is exact for it);
- `multi_modal_projector.linear_1 / linear_2` -> `mlp2x_gelu` (`mlp.0` / `mlp.2`);
- language model: Qwen2 -> our `qwen.QWenLMHeadModel` (arch qwen2); anything else (e.g. Llama) -> the
  generic transformers causal LM ("hf" backend);
- `image_token_index` -> `image_token_id` (the placeholder id the tokens were rendered with).
The parts go through their own loaders: each is written in its native format to a temporary directory
and read back by the same code that loads a hub checkpoint. `config` (a VLMConfig or dict of fields)
supplies `image_mode`, `dtype`, `freeze_towers`; the resolved config has `init_from=path`.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

from ..qwen import QWenLMHeadModel, load_tokenizer
from ..visual.registry import build_tower
from .config import VLMConfig
from .dtypes import torch_dtype
from .projector import Projector, build_projector
from .tokenizers import has_tokenizer_files, load_lm_tokenizer

VISION_BACKENDS = {"clip_vision_model": "hf_clip", "siglip_vision_model": "hf_siglip"}


def _select(backend: str, strategy: str) -> str:
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r}; valid: default, full")
    if backend == "hf_siglip":
        if strategy == "default":
            raise ValueError(
                "Llava config: vision_feature_select_strategy='default' with a SigLIP tower drops a real "
                "patch (SigLIP has no CLS); only 'full' is supported for SigLIP"
            )
        return "patch"  # SigLIP: every token is a patch
    return "patch" if strategy == "default" else "cls_patch"


def _load_tokenizer(path: Path, backend: str):
    """The same tokenizer class `build_vlm` gives this backend, so an import and its reload agree."""
    if not has_tokenizer_files(path):
        return None
    try:
        return load_tokenizer(path) if backend == "qwen" else load_lm_tokenizer(path)
    except (ValueError, FileNotFoundError, OSError) as e:  # logits do not need it; say why it is missing
        warnings.warn(f"{path}: tokenizer not loaded ({e}); set VLMConfig.tokenizer to use chat()", stacklevel=2)
        return None


def llava_parts(
    path: str | Path, config: VLMConfig | dict | None = None
) -> tuple[VLMConfig, nn.Module, Projector, nn.Module, Any, torch.dtype]:
    path = Path(path)
    base = config.to_dict() if isinstance(config, VLMConfig) else dict(config or {})
    dtype = base.get("dtype", "float32")
    cfg = AutoConfig.from_pretrained(str(path))
    if cfg.model_type != "llava":
        raise ValueError(f"{path}/config.json: model_type={cfg.model_type!r}, expected 'llava'")
    vtype = cfg.vision_config.model_type
    if vtype not in VISION_BACKENDS:
        raise ValueError(f"{path}/config.json: vision_config.model_type={vtype!r}; valid: {sorted(VISION_BACKENDS)}")
    backend = VISION_BACKENDS[vtype]
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{path}/config.json: vision_feature_layer={layer!r}; only one int layer is supported")
    select = _select(backend, cfg.vision_feature_select_strategy)
    if cfg.projector_hidden_act != "gelu":
        raise ValueError(f"{path}/config.json: projector_hidden_act={cfg.projector_hidden_act!r}; only 'gelu'")
    lm_backend = "qwen" if cfg.text_config.model_type == "qwen2" else "hf"

    llava = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix="llava_import_"))
    try:
        # Vision tower through our hf tower's own loader (native CLIP/SigLIP directory).
        vdir = tmp / "vision"
        llava.model.vision_tower.save_pretrained(str(vdir))
        if (path / "preprocessor_config.json").is_file():
            shutil.copy(path / "preprocessor_config.json", vdir / "preprocessor_config.json")
        tower = build_tower(backend, str(vdir), feature_layer=layer, select=select,
                            image_mode=base.get("image_mode", "pad"))
        tower.name = str(path)

        # Language model: wrap the decoder and head as a causal LM (built on meta: no random init).
        with torch.device("meta"):
            causal = AutoModelForCausalLM.from_config(cfg.text_config)
        causal.model = llava.model.language_model
        causal.lm_head = llava.lm_head
        if lm_backend == "qwen":
            ldir = tmp / "lm"
            causal.save_pretrained(str(ldir))
            lm = QWenLMHeadModel.from_pretrained(str(ldir))
        else:
            lm = causal
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    src = llava.model.multi_modal_projector
    projector = build_projector("mlp2x_gelu", src.linear_1.in_features, src.linear_1.out_features)
    with torch.no_grad():
        for ours, theirs in ((projector.mlp[0], src.linear_1), (projector.mlp[2], src.linear_2)):
            ours.weight.copy_(theirs.weight)
            if theirs.bias is not None:
                ours.bias.copy_(theirs.bias)
            else:  # multimodal_projector_bias=False: a zero bias is the same function
                ours.bias.zero_()

    resolved = {
        **{k: v for k, v in base.items() if k in ("image_mode", "dtype", "freeze_towers", "tokenizer")},
        "lm": str(path), "lm_backend": lm_backend, "lm_config": None, "projector": "mlp2x_gelu",
        "towers": [{"backend": backend, "name_or_path": str(path), "feature_layer": layer, "select": select}],
        "reduce": None, "reduce_factor": 1, "image_token_id": int(cfg.image_token_id), "init_from": str(path),
    }
    vconfig = VLMConfig.from_dict(resolved)
    tokenizer = _load_tokenizer(Path(vconfig.tokenizer or path), lm_backend)
    if vconfig.freeze_towers:
        tower.requires_grad_(False)
        tower.eval()
    return vconfig, tower, projector, lm, tokenizer, torch_dtype(dtype)


def llava_facts(path: str | Path) -> dict[str, Any]:
    """The Llava config facts the import honours (for logging)."""
    cfg = AutoConfig.from_pretrained(str(path))
    return {
        "vision": cfg.vision_config.model_type, "text": cfg.text_config.model_type,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_token_id": cfg.image_token_id,
    }
