"""Import a transformers `LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration` directory
into our parts, logits unchanged.

`llava_parts(path, config=None) -> (VLMConfig, tower, projector, lm, tokenizer, dtype, extras)`: what
`VLM(...)` is assembled from, then cast to `dtype`, with `extras` (VLM parameter name -> tensor) copied in
(model/model.py does all three: this module sits below it):
- vision tower (CLIP or SigLIP) -> our `hf_clip` / `hf_siglip` tower, with `vision_feature_layer` as
  `feature_layer` and `vision_feature_select_strategy` as `select` ("default" drops CLIP's CLS ->
  "patch"; "full" keeps it -> "cls_patch"; a SigLIP tower has no CLS, so only "full" is exact for it);
- `multi_modal_projector.linear_1 / linear_2` -> `mlp2x_gelu` (`mlp.0` / `mlp.2`);
- language model: Qwen2 -> our `qwen.QWenLMHeadModel` (arch qwen2), unless `config` asks for
  `lm_backend="hf"`; anything else (e.g. Llama) -> the generic transformers causal LM ("hf" backend);
- `image_token_index` -> `image_token_id` (the placeholder id the tokens were rendered with);
- the tokenizer: the directory's own, as it is (`HFTokenizer`, whatever the LM backend), so each `<image>`
  becomes N placeholders with nothing around them and no id is added past the embedding table, as
  transformers' LlavaProcessor does (tests/test_families_native.py compares the ids); its chat template is
  the checkpoint's (tokenizer_config.json, else chat_template.jinja / .json as LLaVA-1.5 ships it), and one
  none of ours matches renders as it is (model/backbones.py, `chat_template="own"`).
- model_type "llava_next" (LLaVA-NeXT) also maps `image_grid_pinpoints` (anyres on), the learned
  `image_newline` (extras) and transformers' semantics: a newline after each row, every image of a sample
  tiled (`multi_image="anyres"`), no `anyres_max`. It needs patch-only features per crop, so a CLIP tower
  with "full" is refused. A plain "llava" import keeps the resolution keys `config` gives (anyres on a
  LLaVA-1.5 model starts from a fresh newline).
The parts go through their own loaders: each is written in its native format to a temporary directory
and read back by the same code that loads a hub checkpoint. `config` (a VLMConfig or dict of fields)
supplies `image_mode`, `dtype`, `freeze_towers`, `tokenizer`, `lm_backend="hf"`; the resolved config has
`init_from=path`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from ..qwen import QWenLMHeadModel
from ..visual.registry import build_tower
from .config import VLMConfig
from .dtypes import torch_dtype
from .families import chat_template_text
from .projector import Projector, build_projector
from .tokenizers import HFTokenizer, has_tokenizer_files

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


def _load_tokenizer(path: Path):
    """The checkpoint's own tokenizer as it is, whatever the LM backend: the released processor
    (LlavaProcessor) expands `<image>` to N image tokens with nothing around them and adds no token, so
    neither do we. Qwen's interface (qwen.load_tokenizer) would add `<|vision_start|>` / `<|vision_end|>`
    spans, and ids past a full embedding table (vocab_size == len(tokenizer))."""
    if not has_tokenizer_files(path):
        return None
    try:
        tok = HFTokenizer(path)
    except (ValueError, FileNotFoundError, OSError) as e:  # logits do not need it; say why it is missing
        warnings.warn(f"{path}: tokenizer not loaded ({e}); set VLMConfig.tokenizer to use chat()", stacklevel=2)
        return None
    if tok.chat_template is None:  # LLaVA-1.5's layout: the template is the processor's chat_template.json
        tok.hf_tokenizer.chat_template = chat_template_text(path)
    return tok


FAMILIES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
RESOLUTION_KEYS = ("image_grid_pinpoints", "image_newline", "multi_image", "anyres_max")


def _vision_facts(path: Path, cfg) -> tuple[str, int, str]:
    """(tower backend, feature layer, select) of a Llava(-NeXT) config, or a ValueError naming the key."""
    if cfg.model_type not in FAMILIES:
        raise ValueError(f"{path}/config.json: model_type={cfg.model_type!r}, expected one of {sorted(FAMILIES)}")
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
    if cfg.model_type == "llava_next" and select != "patch":
        raise ValueError(f"{path}/config.json: vision_feature_select_strategy='full' keeps CLIP's CLS in every "
                         f"crop; anyres here needs patch tokens only ('default')")
    return backend, layer, select


def _resolution_keys(cfg, base: dict) -> dict[str, Any]:
    """The VLMConfig resolution keys of the import: LLaVA-NeXT's from its config, else the caller's."""
    if cfg.model_type == "llava_next":
        pins = [[int(h), int(w)] for h, w in cfg.image_grid_pinpoints]
        return {"image_grid_pinpoints": pins, "image_newline": True, "multi_image": "anyres", "anyres_max": None}
    return {k: base[k] for k in RESOLUTION_KEYS if k in base}


def _import_lm(llava: nn.Module, cfg, lm_backend: str, tmp: Path) -> nn.Module:
    """The decoder and head as a causal LM: ours for Qwen2 (through its own loader), else transformers'."""
    with torch.device("meta"):  # built on meta: no random init, the real modules go in below
        causal = AutoModelForCausalLM.from_config(cfg.text_config)
    causal.model = llava.model.language_model
    causal.lm_head = llava.lm_head
    if lm_backend != "qwen":
        return causal
    ldir = tmp / "lm"
    causal.save_pretrained(str(ldir))
    return QWenLMHeadModel.from_pretrained(str(ldir))


def _import_projector(src: nn.Module) -> Projector:
    projector = build_projector("mlp2x_gelu", src.linear_1.in_features, src.linear_1.out_features)
    with torch.no_grad():
        for ours, theirs in ((projector.mlp[0], src.linear_1), (projector.mlp[2], src.linear_2)):
            ours.weight.copy_(theirs.weight)
            if theirs.bias is not None:
                ours.bias.copy_(theirs.bias)
            else:  # multimodal_projector_bias=False: a zero bias is the same function
                ours.bias.zero_()
    return projector


def llava_parts(
    path: str | Path, config: VLMConfig | dict | None = None
) -> tuple[VLMConfig, nn.Module, Projector, nn.Module, Any, torch.dtype, dict[str, torch.Tensor]]:
    path = Path(path)
    base = config.to_dict() if isinstance(config, VLMConfig) else dict(config or {})
    dtype = base.get("dtype", "float32")
    cfg = AutoConfig.from_pretrained(str(path))
    backend, layer, select = _vision_facts(path, cfg)
    qwen_text = cfg.text_config.model_type == "qwen2"
    lm_backend = "qwen" if qwen_text and base.get("lm_backend") != "hf" else "hf"

    llava = FAMILIES[cfg.model_type].from_pretrained(str(path), dtype=torch.float32)
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
        lm = _import_lm(llava, cfg, lm_backend, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    projector = _import_projector(llava.model.multi_modal_projector)
    extras = {}
    if cfg.model_type == "llava_next":
        extras["image_newline"] = llava.model.image_newline.detach().clone()

    resolved = {
        **{k: v for k, v in base.items() if k in ("image_mode", "dtype", "freeze_towers", "tokenizer")},
        "lm": str(path), "lm_backend": lm_backend, "lm_config": None, "projector": "mlp2x_gelu",
        "towers": [{"backend": backend, "name_or_path": str(path), "feature_layer": layer, "select": select}],
        "reduce": None, "reduce_factor": 1, "image_token_id": int(cfg.image_token_id), "init_from": str(path),
        **_resolution_keys(cfg, base),
    }
    vconfig = VLMConfig.from_dict(resolved)
    tokenizer = _load_tokenizer(Path(vconfig.tokenizer or path))
    if vconfig.freeze_towers:
        tower.requires_grad_(False)
        tower.eval()
    return vconfig, tower, projector, lm, tokenizer, torch_dtype(dtype), extras


def is_llava_next_dir(path: str | Path) -> bool:
    """A transformers LLaVA-NeXT directory (config.json, model_type "llava_next"); model/paths.py's
    `is_llava_dir` accepts both "llava" and "llava_next" (what test.py, serve and evaluation check)."""
    native = Path(path) / "config.json"
    try:
        return native.is_file() and json.loads(native.read_text()).get("model_type") == "llava_next"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def llava_facts(path: str | Path) -> dict[str, Any]:
    """The Llava config facts the import honours (for logging)."""
    cfg = AutoConfig.from_pretrained(str(path))
    return {
        "vision": cfg.vision_config.model_type, "text": cfg.text_config.model_type,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_token_id": cfg.image_token_id,
    }
