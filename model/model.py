"""The VLM: vision tower(s) -> projector -> LM placeholders, the registries that name its parts, and the one
function that materialises it from a config (`build_vlm`) or a checkpoint (`load_vlm` = `VLM.from_pretrained`).

Swap a backbone with one line:
- a backbone pair: one entry of `PRESETS` below (`lm`, `lm_backend`, `towers`), or one key in a YAML
  config / on the command line (`model.lm=meta-llama/Llama-3.2-1B-Instruct model.lm_backend=hf`,
  `model.towers=[{backend: hf_siglip, name_or_path: google/siglip-so400m-patch14-384}]`);
- a new LM family: one line in `LM_BACKBONES` below (a subclass of the abstract `LMBackbone`,
  model/backbones.py);
- a new vision backend: one line in `visual.registry.BACKENDS` (a subclass of the abstract `VisionTower`,
  visual/base.py); projectors: `model.projector.PROJECTOR_KINDS`.
Each registry is a plain dict filled where it is written, from explicit imports; importing a module never
registers anything.

Contract:
- `VLM(config, towers, projector, lm, tokenizer=None)` assembles given parts, binding the LM to its
  backbone class (`LM_BACKBONES[config.lm_backend]`: special ids, chat template, LoRA defaults), and
  checks that the projector's input width is the towers' width and its output width the LM's embedding
  width (an error names both). `VLM.resolution` (built once, model/anyres.py `build_resolution`) is the
  one rule from an image's size to its crops and tokens (visual/resolution.py): "fixed" with no resolution
  key set (every image `tokens_per_image` rows), "anyres" with `image_grid_pinpoints` (LLaVA-NeXT; then
  `image_newline` is a learned [D_lm] parameter, trained and saved with the projector).
- `build_vlm(preset_or_config, **overrides) -> VLM` builds every part named by the config (a preset name
  from `PRESETS`, a dict of VLMConfig fields or a VLMConfig): the LM and its tokenizer through the backbone
  class `LM_BACKBONES[lm_backend]`, the towers (`model.parts`, through `visual.registry.BACKENDS`), the
  projector; frozen towers in `tower_dtype`. `init_from` (a transformers Llava directory) imports that model
  instead (model/llava.py).
- `load_vlm(dir, **overrides) -> VLM`, also `VLM.from_pretrained`: a directory written by
  `VLM.save_pretrained` is rebuilt from its config (base models from their names/paths, the saved
  tokenizer) with its tensors loaded on top, LoRA adapters re-created from `lora/adapter_config.json`; a
  transformers Llava / LLaVA-NeXT directory (config.json with model_type "llava" / "llava_next") is
  imported; a Qwen-VL(-Chat) directory (model_type "qwen" + `visual`) is built from our parts read from it
  (model/qwenvl_chat.py; also as `init_from`). Overrides are VLMConfig
  fields, plus `tower_path` (a path, or a list with one per tower) to point the towers at another copy of
  their base checkpoints. Returns the model in eval mode.
- `forward(input_ids [B, T], attention_mask [B, T] | None, pixel_values [n_images, 3, H, W] | None,
  labels [B, T] | None, image_counts [B] | None, image_features [n_images, T, C] | None, **kw)
  -> VLMOutput(loss, logits, past_key_values)`. One path for every LM backbone: token embeddings
  (trainable token rows applied) -> image rows written at the placeholders (core/placeholders.py) ->
  the backbone's hidden states -> the loss at target positions only (chunked, `core.loss`), with
  `VLMOutput.logits` computed lazily on first access; `return_logits=True` computes them up front. In
  training mode, with an LM whose backbone has `rows_at_targets` (ours, qwen), the LM's last block runs its
  attention output and MLP for the target positions alone (`output_rows`; its keys and values still for
  every position): the same loss and gradients; reading `.logits` of that forward runs the LM once more
  over every position.
  `pixel_values` is the flat batch of every sample's images in sample order; each image fills exactly
  `tokens_per_image` placeholders (`image_token_id`) in the same order. anyres: `pixel_values`
  [n_crops_total, 3, S, S] holds each image's crops consecutively (visual/anyres.py), with `image_sizes`
  [n_images, 2] (original height, width) and `image_crops` [n_images]; the towers and the projector run
  on all crops at once, then model/anyres.py packs each image's rows (base, unpadded tile map, newlines)
  into `resolution.layout(...).tokens` rows. `image_grid` [n_images, 2] (native-resolution patch grids)
  is accepted and dispatched to the native path (model/native.py; not wired here yet). Frozen towers (no parameter
  requires grad) run in eval mode under `no_grad`, in `config.tower_dtype` when set (`cast_frozen_towers`);
  their features are cast to the projector's dtype. `image_features [n_images, T, C]` (the towers'
  output, e.g. from a feature cache) may replace `pixel_values`: the towers are skipped. `image_rows [n_slots, D]`
  (from `encode_image_inputs(**image_inputs)`, e.g. a serving cache) replaces every image input: the towers and
  the projector are skipped and the rows are written at the placeholders as given.
  `keep_hidden=True` with `logits_to_keep` (generation): `VLMOutput.hidden_states` holds the kept positions'
  final hidden states `[B, n, D]` and `.logits` is computed only when read (serving's screened greedy head).
  Labels are not shifted here (`core.loss.shift_targets` is the one shift). `cu_seqlens` / `position_ids`
  (packing) go to the backbone (qwen only). In training mode a batch without any image still runs the
  projector (and trainable towers, in eval mode) on one blank image and adds `0 * rows.sum()`, so every
  rank uses the same parameters at every step (DDP without unused-parameter detection, FSDP, ZeRO-3).
- `generate(input_ids, attention_mask=None, pixel_values=None, image_sizes=None, image_crops=None,
  image_grid=None, **gen_kw) -> list[list[int]]` (new tokens only), `chat(images, messages, **gen_kw) -> str`
  and `chat_batch([(images, messages), ...]) -> [str]` (left-padded, one generate call); `chat_format`,
  `stop_token_ids`, `pad_token_id`, `decode(ids)`, `image_tokens(images)` (each image's count, None in
  fixed mode), `image_inputs(images)` (the image keyword inputs of one conversation) and
  `chat_ids(messages, n_images, image_tokens=None)` are what any other front end needs.
- `save_pretrained(dir, trainable_only=False)` (model/checkpoint.py); `merge_lora()` folds peft adapters
  into the LM; `fold_token_rows()` writes trained token rows into the embedding table;
  `gradient_checkpointing_enable()` forwards to the backbone; `train()` keeps frozen towers in eval mode.

Import order inside model/ (no cycle; tests/test_model_imports.py checks it): config, paths -> projector,
token_rows, quant, checkpoint, backbones, parts, llava, anyres, qwenvl_chat -> model -> merge, export, bigbro, plan.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..core.loss import (
    DEFAULT_CHUNK_SIZE,
    decode_logits,
    full_logits_loss,
    rows_loss,
    supervised_loss,
    target_rows,
)
from ..core.placeholders import embed_with_placeholders, scatter_image_features
from ..dataset.rendering import ChatFormat, render
from ..dataset.sample import IMAGE_MARKER, Sample
from ..visual.pixels import prepare_images
from .anyres import build_resolution, image_layouts, pack_anyres
from .backbones import HFCausalLMBackbone, LMBackbone, QwenBackbone, unwrap
from .checkpoint import LORA_DIR, TOKENIZER_DIR, load_trainable_weights, read_vlm_config, save_vlm
from .config import VLMConfig
from .dtypes import torch_dtype
from .families import family_of
from .llava import is_llava_next_dir, llava_parts
from .native import native_rows, tokens_per_image
from .parts import build_towers, named_source
from .paths import CONFIG_FILE, resolve_model_dir
from .projector import Projector, build_projector
from .quant import QUANT_FILE, dequantize_lm, has_4bit, quantize_lm_4bit
from .qwenvl_chat import is_qwenvl_chat_dir, qwenvl_chat_config
from .released import ReleasedVLM
from .token_rows import TokenRows

__all__ = ["LM_BACKBONES", "PRESETS", "VLM", "VLMConfig", "VLMOutput", "build_vlm", "load_vlm", "resolve_config"]

def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device` right now, or None outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


# ----- registries ----------------------------------------------------------------------------------
LM_BACKBONES: dict[str, type[LMBackbone]] = {
    "qwen": QwenBackbone,  # our qwen/ (Qwen-1, Qwen2/2.5, Qwen3)
    "hf": HFCausalLMBackbone,  # any transformers causal LM: Llama, Mistral, Gemma, Phi-3, SmolLM, ...
}


def _tower(backend: str, name_or_path: str, feature_layer: int = -2, select: str = "patch", **kw: Any) -> dict:
    return {"backend": backend, "name_or_path": name_or_path, "feature_layer": feature_layer, "select": select, **kw}


# A tiny LM for the offline demo and tests: Qwen2 layout, a vocabulary that holds the Qwen-1 specials.
TINY_LM = {
    "arch": "qwen2", "vocab_size": 151936, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
    "max_position_embeddings": 2048, "image_token_id": 151646,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The original pair: Qwen-7B-Chat + SigLIP so400m/14 at 384 (729 patches, no CLS).
    "qwen7b-siglip": dict(
        lm="Qwen/Qwen-7B-Chat", lm_backend="qwen",
        towers=[_tower("hf_siglip", "google/siglip-so400m-patch14-384", feature_layer=-2)],
        image_mode="resize",
    ),
    "qwen1.8b-clip336": dict(
        lm="Qwen/Qwen-1_8B-Chat", lm_backend="qwen",
        towers=[_tower("hf_clip", "openai/clip-vit-large-patch14-336", feature_layer=-2)],
        image_mode="pad",
    ),
    "qwen2.5-0.5b-siglip": dict(
        lm="Qwen/Qwen2.5-0.5B-Instruct", lm_backend="qwen",
        towers=[_tower("hf_siglip", "google/siglip-so400m-patch14-384", feature_layer=-2)],
        image_mode="resize",
    ),
    # Any transformers LM: the generic backbone, its own tokenizer and chat template (Llama-3 here).
    "llama3.2-1b-siglip": dict(
        lm="meta-llama/Llama-3.2-1B-Instruct", lm_backend="hf",
        towers=[_tower("hf_siglip", "google/siglip-so400m-patch14-384", feature_layer=-2)],
        image_mode="resize",
    ),
    # Offline: a tiny timm CNN tower (random init) and a tiny scratch LM. Point `tokenizer` at a
    # directory holding `qwen.tiktoken` (e.g. ../shared/data/qwen1) to chat with it.
    "tiny": dict(
        lm="scratch", lm_backend="qwen", lm_config=dict(TINY_LM), tokenizer=None,
        towers=[_tower("timm", "test_resnet", feature_layer=-1, pretrained=False)],  # 5x5 grid of 96 ch
        image_mode="resize", projector="mlp2x_gelu",
    ),
}


def resolve_config(preset_or_config: str | dict | VLMConfig, **overrides: Any) -> VLMConfig:
    """A preset name, a dict of VLMConfig fields or a VLMConfig -> VLMConfig (with overrides applied)."""
    if isinstance(preset_or_config, VLMConfig):
        base = preset_or_config.to_dict()
    elif isinstance(preset_or_config, dict):
        base = copy.deepcopy(preset_or_config)
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown VLM preset {preset_or_config!r}; valid: {', '.join(sorted(PRESETS))}")
        base = copy.deepcopy(PRESETS[preset_or_config])
    else:
        raise TypeError(f"expected a preset name, dict or VLMConfig, got {type(preset_or_config).__name__}")
    base.update(copy.deepcopy(overrides))
    config = VLMConfig.from_dict(base)
    if config.lm_backend not in LM_BACKBONES:
        raise ValueError(f"VLMConfig.lm_backend={config.lm_backend!r}; valid: {', '.join(LM_BACKBONES)}")
    return config


# ----- the model -----------------------------------------------------------------------------------
@dataclass(init=False)
class VLMOutput:
    """`loss`, `logits` `[B, T, V]`, `past_key_values`. When the loss was computed at target positions
    only, `logits_fn` computes the full logits on first access of `.logits` (training never reads them).
    A dataclass so that DDP finds the loss among its fields (it marks parameters unused otherwise)."""

    loss: torch.Tensor | None
    past_key_values: Any
    _logits: torch.Tensor | None
    _logits_fn: Any
    hidden_states: torch.Tensor | None = None  # [B, n, D] with keep_hidden (generation's kept positions)

    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor | None = None, past_key_values: Any = None,
                 logits_fn: Any = None):
        self.loss, self.past_key_values = loss, past_key_values
        self._logits, self._logits_fn = logits, logits_fn

    @property
    def logits(self) -> torch.Tensor | None:
        if self._logits is None and self._logits_fn is not None:
            self._logits, self._logits_fn = self._logits_fn(), None  # [B, T, V], once, on demand
        return self._logits


def _towers_frozen(towers: nn.Module) -> bool:
    return not any(p.requires_grad for p in towers.parameters())


def lm_width(lm: nn.Module) -> int:
    return int(unwrap(lm).get_input_embeddings().weight.shape[1])


class VLM(nn.Module):
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE  # rows of [rows, V] logits alive at once in the loss

    def __init__(
        self,
        config: VLMConfig,
        towers: nn.Module,
        projector: Projector,
        lm: nn.Module,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if config.lm_backend not in LM_BACKBONES:
            raise ValueError(f"VLMConfig.lm_backend={config.lm_backend!r}; valid: {', '.join(LM_BACKBONES)}")
        self.config = config
        self.towers = towers
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        d_vision, d_lm = int(towers.hidden_size), lm_width(lm)
        if projector.in_dim != d_vision:
            raise ValueError(
                f"projector input width {projector.in_dim} != vision tower width {d_vision} ({config.towers})"
            )
        if projector.out_dim != d_lm:
            raise ValueError(f"projector output width {projector.out_dim} != LM embedding width {d_lm} ({config.lm})")
        if projector.reduce is not None and towers.num_tokens != towers.grid[0] * towers.grid[1]:
            raise ValueError(
                f"token reduction {projector.reduce} needs patch tokens only, but the tower returns "
                f"{towers.num_tokens} tokens for a {towers.grid[0]}x{towers.grid[1]} grid (select='patch')"
            )
        if config.max_pixels is not None or getattr(towers, "max_num_patches", None):
            # Native resolution never feeds the square crop: its grid (e.g. SigLIP-384/14's 27x27) need not
            # divide by the merge; the figure kept is what a square crop would give (checkpoint facts, plan).
            s = int(projector.reduce_factor) if projector.reduce is not None else 1
            self.tokens_per_image = (int(towers.grid[0]) // s) * (int(towers.grid[1]) // s)
        else:
            self.tokens_per_image = projector.tokens_out(int(towers.num_tokens))  # rows per crop
        # The one rule from an image's size to its crops and tokens (fixed unless a resolution key is set).
        self.resolution = build_resolution(config, towers, projector, self.tokens_per_image)
        anyres_newline = self.resolution.mode == "anyres" and self.resolution.image_newline
        # LLaVA-NeXT's learned row separator, at the LM's width; trains and saves with the projector
        # (config.PROJECTOR_PREFIXES).
        self.register_parameter("image_newline", nn.Parameter(torch.randn(d_lm) * d_lm**-0.5) if anyres_newline
                                else None)
        # The family's rules (a plain object: the weights stay in self.lm, names unchanged).
        self.backbone = LM_BACKBONES[config.lm_backend](config, lm, tokenizer)
        self.image_token_id = self.backbone.image_token_id
        ids = self.backbone.trainable_token_ids
        self.token_rows = TokenRows.from_embedding(self.backbone.embedding(lm), ids) if ids else None

    def train(self, mode: bool = True) -> VLM:
        super().train(mode)
        if _towers_frozen(self.towers):
            self.towers.eval()  # frozen towers never run dropout / batch-norm updates
        return self

    # ----- images ------------------------------------------------------------------------------------
    @property
    def image_processor(self):
        return self.towers.processor

    def cast_frozen_towers(self) -> None:
        """Put frozen towers in `config.tower_dtype` (e.g. bf16); trainable towers stay in `config.dtype`."""
        want = self.config.tower_dtype if _towers_frozen(self.towers) else None
        self.towers.to(torch_dtype(want or self.config.dtype))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images * tokens_per_image, D_lm] projected rows, image by image."""
        tower_dtype = next(self.towers.parameters(), pixel_values).dtype
        if _towers_frozen(self.towers):
            self.towers.eval()  # frozen towers never run dropout / batch-norm updates
            with torch.no_grad():
                feats = self.towers(pixel_values.to(tower_dtype))  # [N, T, C]
        else:
            feats = self.towers(pixel_values.to(tower_dtype))
        return self.project_features(feats)

    def project_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Tower output [n_images, T, C] (e.g. from a feature cache) -> [n_images * tokens_per_image, D_lm]."""
        want = (int(self.towers.num_tokens), int(self.towers.hidden_size))
        if feats.dim() != 3 or tuple(feats.shape[1:]) != want:
            raise ValueError(f"image features must be [n_images, {want[0]}, {want[1]}] (the towers' output), "
                             f"got {tuple(feats.shape)}")
        # Features of a bf16 tower (or a cache) are cast to the projector's dtype.
        proj_dtype = next(self.projector.parameters(), feats).dtype
        rows = self.projector(feats.to(proj_dtype))  # [N, tokens_per_image, D]
        assert rows.shape[1] == self.tokens_per_image, (rows.shape, self.tokens_per_image)
        return rows.reshape(-1, rows.shape[-1])  # [N * tokens_per_image, D]

    def encode_image_inputs(self, pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                            image_crops: torch.Tensor | None = None,
                            image_grid: torch.Tensor | None = None) -> torch.Tensor | None:
        """Image inputs (`image_inputs`' keys, several conversations' concatenated) -> the placeholder rows
        `[n_slots, D]` in image order, exactly what `forward` writes at the placeholders (its `image_rows`)."""
        return self._image_rows(None, pixel_values, None, None, image_sizes, image_crops, image_grid)

    def _image_rows(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_counts: Any,
        image_features: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
        image_crops: torch.Tensor | None = None, image_grid: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The image rows for the placeholders, [n_slots, D] (None without images), after checking counts."""
        if pixel_values is not None and image_features is not None:
            raise ValueError("give either pixel_values or image_features (cached tower output), not both")
        given = pixel_values if image_features is None else image_features
        n_rows = 0 if given is None else int(given.shape[0])  # crops (fixed mode: images)
        if image_grid is not None or self.resolution.mode in ("native", "naflex"):
            return self._native_rows(input_ids, given, image_counts, image_grid)
        anyres = self.resolution.mode == "anyres"
        if anyres and n_rows and (image_sizes is None or image_crops is None):
            raise ValueError("anyres: pixel_values [n_crops, 3, S, S] need image_sizes [n_images, 2] and "
                             "image_crops [n_images] (visual/pixels.py prepare_images makes all three)")
        n_images = len(image_crops) if anyres and n_rows else n_rows
        counts = None
        if image_counts is not None:
            counts = [int(c) for c in (image_counts.tolist() if torch.is_tensor(image_counts) else image_counts)]
            if len(counts) != input_ids.shape[0] or sum(counts) != n_images:
                raise ValueError(f"image_counts {counts} do not match {input_ids.shape[0]} samples / {n_images} images")
        layouts = None
        if anyres and n_rows:
            per_image = None if counts is None else [c for c in counts for _ in range(c)]
            layouts = image_layouts(self.resolution, image_sizes, image_crops, per_image)
        if counts is not None:
            tokens = [lay.tokens for lay in layouts] if layouts else [self.tokens_per_image] * n_images
            self._check_slots(input_ids, counts, tokens)
        if n_rows == 0:
            return None
        if image_features is not None:
            rows = self.project_features(image_features)  # cached tower output: the tower is skipped
        else:
            rows = self.encode_images(pixel_values)  # [n_rows * tokens_per_image, D]
        if not anyres:
            return rows
        rows = rows.view(n_rows, self.tokens_per_image, -1)  # [n_crops, T, D]
        return pack_anyres(rows, image_sizes, layouts, self.resolution, self.image_newline)  # [sum tokens, D]

    def _check_slots(self, input_ids: torch.Tensor, counts: list[int], tokens: list[int]) -> None:
        """Each sample's placeholders must equal its images' token counts (`tokens`, image by image)."""
        slots = (input_ids == self.image_token_id).sum(dim=1).tolist()
        start = 0
        for b, (c, s) in enumerate(zip(counts, slots)):
            want = sum(tokens[start : start + c])
            start += c
            if s == want:
                continue
            if self.resolution.mode == "fixed":
                raise ValueError(f"sample {b}: {s} image placeholders but {c} image(s) x {self.tokens_per_image} tokens")
            raise ValueError(f"sample {b}: {s} image placeholders but {c} image(s) of "
                             f"{tokens[start - c : start]} tokens = {want}")

    def _native_rows(self, input_ids: torch.Tensor, given: torch.Tensor | None, image_counts: Any,
                     image_grid: torch.Tensor | None) -> torch.Tensor | None:
        """Native-resolution inputs (modes "native" / "naflex"): `pixel_values` [n_patches, 3, p, p] with
        `image_grid` [n_images, 2] -> the towers' patch rows -> model/native.py's merge + projector."""
        res = self.resolution
        if res.mode not in ("native", "naflex"):
            raise ValueError(f"image_grid was given but this model's resolution mode is {res.mode!r}")
        if given is not None and image_grid is None:
            raise ValueError(f"{res.mode} resolution: pixel_values [n_patches, 3, p, p] need image_grid "
                             f"[n_images, 2] (visual/pixels.py prepare_images makes both)")
        grid = torch.zeros(0, 2, dtype=torch.long) if image_grid is None else image_grid.view(-1, 2)
        merge = res.merge if res.mode == "native" else 1
        tokens = tokens_per_image(grid, merge)
        if image_counts is not None:
            counts = [int(c) for c in (image_counts.tolist() if torch.is_tensor(image_counts) else image_counts)]
            if len(counts) != input_ids.shape[0] or sum(counts) != len(tokens):
                raise ValueError(f"image_counts {counts} do not match {input_ids.shape[0]} samples / "
                                 f"{len(tokens)} images")
            self._check_slots(input_ids, counts, tokens)
        if given is None or given.shape[0] == 0:
            return None
        if given.dim() != 4:  # cached [n, T, C] features have no native-resolution form (refused at load)
            raise ValueError(f"{res.mode} resolution takes patch rows [n_patches, 3, p, p], got {tuple(given.shape)}")
        tower_dtype = next(self.towers.parameters(), given).dtype
        if _towers_frozen(self.towers):
            self.towers.eval()
            with torch.no_grad():
                rows = self.towers.forward_grid(given.to(tower_dtype), grid)  # [n_patches, C]
        else:
            rows = self.towers.forward_grid(given.to(tower_dtype), grid)
        proj_dtype = next(self.projector.parameters(), rows).dtype
        return native_rows(rows.to(proj_dtype), grid, merge, self.projector)  # [sum tokens, D]

    def _idle_vision_anchor(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """A zero scalar that runs the projector (and trainable towers) on one blank image when a training
        batch has no image at all, None otherwise. Why: under DDP with unused-parameter detection off, FSDP
        or ZeRO-3, every rank must use the same parameters at every step, or the ranks whose batch did use
        them wait forever in the gradient all-reduce."""
        if rows is not None or not (self.training and torch.is_grad_enabled()):
            return None
        if _towers_frozen(self.towers) and not any(p.requires_grad for p in self.projector.parameters()):
            return None
        device = next(self.projector.parameters()).device
        size = int(self.towers.image_size)
        was_training = self.towers.training
        self.towers.eval()  # batch-norm running statistics must not see the blank image
        try:
            blank = self.encode_images(torch.zeros(1, 3, size, size, device=device))  # [tokens_per_image, D]
        finally:
            self.towers.train(was_training)
        if self.image_newline is not None:  # anyres's newline trains with the projector: same reason
            blank = torch.cat([blank, self.image_newline.to(blank.dtype)[None]])
        return blank.sum() * 0.0

    # ----- forward -----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """[B, T] ids + [n_slots, D] image rows -> [B, T, D] LM input embeddings (the one path for every LM)."""
        embeds = embed_with_placeholders(self.backbone.embedding(self.lm), input_ids, self.image_token_id)
        if self.token_rows is not None:
            embeds = self.token_rows(input_ids, embeds)
        return scatter_image_features(input_ids, embeds, rows, self.image_token_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_counts: Any = None,
        image_features: torch.Tensor | None = None,
        return_logits: bool | None = None,
        logits_to_keep: int = 0,
        image_sizes: torch.Tensor | None = None,
        image_crops: torch.Tensor | None = None,
        image_grid: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        keep_hidden: bool = False,
        **kw: Any,
    ) -> VLMOutput:
        # `image_features` [n_crops, T, C]: cached tower output (dataprocess/cache_features.py).
        # anyres: `image_sizes` [n_images, 2] (height, width), `image_crops` [n_images]; native: `image_grid`.
        # `image_rows` [n_slots, D]: the placeholder rows themselves (`encode_image_inputs`, a serving cache).
        if image_rows is not None:
            if pixel_values is not None or image_features is not None:
                raise ValueError("give image_rows (projected rows) or pixel_values / image_features, not both")
            rows = image_rows
        else:
            rows = self._image_rows(input_ids, pixel_values, image_counts, image_features,
                                    image_sizes, image_crops, image_grid)  # [n_slots, D] | None
        embeds = self.embed(input_ids, rows)  # [B, T, D]
        anchor = self._idle_vision_anchor(rows)  # 0-valued scalar, or None
        if anchor is not None:
            embeds = embeds + anchor.to(embeds.dtype)
        bb, lm = self.backbone, self.lm
        if not bb.plain_head(lm):  # the LM post-processes its logits: only its own forward is exact
            logits, pkv = bb.full_logits(lm, embeds, attention_mask, **kw)
            loss = None if labels is None else full_logits_loss(logits, labels, kw.get("cu_seqlens"))
            return VLMOutput(loss, logits, pkv)
        if labels is not None:
            kw.setdefault("use_cache", False)  # a training forward needs no KV cache
        head = bb.output_head(lm)
        if labels is not None and return_logits is not True and self.training and bb.rows_at_targets:
            # A training step: the LM's last block runs for the target positions alone (its keys and values
            # still for every position), the loss reads those rows; `.logits` would need every position.
            rows, targets = target_rows(labels, kw.get("cu_seqlens"))  # [B, T], [N]
            if targets.numel():
                hidden, pkv = bb.hidden_states(lm, embeds, attention_mask, output_rows=rows, **kw)  # [N, D]
                loss = rows_loss(hidden, head, targets, self.loss_chunk_size)
                grad = torch.is_grad_enabled()

                def every_position() -> torch.Tensor:  # read only if `.logits` is: the LM once more, whole
                    with torch.set_grad_enabled(grad):
                        return head(bb.hidden_states(lm, embeds, attention_mask, **kw)[0])  # [B, T, V]

                return VLMOutput(loss, past_key_values=pkv, logits_fn=every_position)
        hidden, pkv = bb.hidden_states(lm, embeds, attention_mask, **kw)  # [B, T, D]
        if labels is not None and return_logits is not True:
            # Supervised-only logits: the chunked loss at target positions (the shift lives in core/loss.py).
            loss = supervised_loss(hidden, head, labels, kw.get("cu_seqlens"), self.loss_chunk_size)
            return VLMOutput(loss, past_key_values=pkv, logits_fn=lambda: head(hidden))
        if logits_to_keep > 0 and labels is None:
            hidden = hidden[:, -logits_to_keep:]  # [B, n, D]: generation reads the last position only
            if keep_hidden:  # a greedy screen picks tokens from `hidden_states`; logits only if read
                grad = torch.is_grad_enabled()

                def logits_fn() -> torch.Tensor:
                    with torch.set_grad_enabled(grad):  # as if computed here (decode_logits depends on it)
                        return decode_logits(hidden, head)  # [B, n, V]

                out = VLMOutput(None, past_key_values=pkv, logits_fn=logits_fn)
                out.hidden_states = hidden
                return out
            logits = decode_logits(hidden, head)  # [B, n, V]
        else:
            logits = head(hidden)  # [B, T, V]
        loss = None if labels is None else full_logits_loss(logits, labels, kw.get("cu_seqlens"))
        return VLMOutput(loss, logits, pkv)

    # ----- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_crops: torch.Tensor | None = None,
        image_grid: torch.Tensor | None = None,
        **gen_kw: Any,
    ) -> list[list[int]]:
        self.prepare_attention(_autocast_dtype(input_ids.device))
        rows = self._image_rows(input_ids, pixel_values, None, None, image_sizes, image_crops, image_grid)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, rows)  # [B, T, D]
        return self.backbone.generate(self.lm, input_ids, embeds, attention_mask, **gen_kw)

    @property
    def chat_format(self) -> ChatFormat:
        """The LM's chat template with its ids (renders training samples and prompts)."""
        return self.backbone.need_format()

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation for chat stops at any of these ids (end of turn first)."""
        return self.backbone.stop_token_ids

    @property
    def pad_token_id(self) -> int:
        """The id that left-pads batched prompts (masked out, never attended)."""
        return self.backbone.pad_token_id

    def decode(self, ids: list[int]) -> str:
        """New token ids -> text, without special tokens. Embedding tables have spare rows past the
        vocabulary (151936 vs 151851 for Qwen); an undertrained model can emit them, and they have no text."""
        return self.tokenizer.decode([t for t in ids if t < len(self.tokenizer)], skip_special_tokens=True)

    def chat_ids(self, messages: list[dict], n_images: int, image_tokens: list[int] | None = None) -> list[int]:
        """Prompt ids in the LM's chat template with each `<image>` expanded to its span, plus the reply
        header: the same rendering as training (`dataset.rendering.render`), with this model's placeholder.
        `image_tokens`: each image's count (`VLM.image_tokens`); None = `tokens_per_image` for every image."""
        fmt = self.chat_format
        # render checks each message's role and content; a bad one is left to it, uncounted here.
        n_markers = sum(m["content"].count(IMAGE_MARKER) for m in messages
                        if isinstance(m, dict) and isinstance(m.get("content"), str))
        if n_markers != n_images:
            raise ValueError(f"chat: {n_markers} {IMAGE_MARKER} marker(s) in the messages but {n_images} image(s)")
        sample = Sample(id="chat", messages=list(messages), images=[f"<image {i}>" for i in range(n_images)])
        count: Any = self.tokens_per_image
        if image_tokens is not None:
            if len(image_tokens) != n_images:
                raise ValueError(f"chat: {len(image_tokens)} token count(s) for {n_images} image(s)")
            count = lambda kind, i: image_tokens[i]  # noqa: E731 (render's (kind, index) -> count)
        return render(sample, fmt, count, add_generation_prompt=True, image_token_id=self.image_token_id).input_ids

    def image_tokens(self, images: list) -> list[int] | None:
        """Each image's token count for ONE conversation's images (`resolution.layout` of its size and the
        number of images); None in fixed mode (every image `tokens_per_image`)."""
        res = self.resolution
        if res.mode == "fixed":
            return None
        for i, img in enumerate(images):
            if not hasattr(img, "size"):
                raise TypeError(f"image {i}: expected a PIL.Image, got {type(img).__name__}")
        return [res.layout(img.size[0], img.size[1], len(images)).tokens for img in images]

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """The images of ONE conversation -> the model's image inputs (visual/pixels.py `prepare_images`):
        `pixel_values`, plus `image_sizes` and `image_crops` (anyres) or `image_grid` (native / naflex)."""
        if not images:
            return {}
        return prepare_images(list(images), self.resolution, self.image_processor, len(images))

    @staticmethod
    def _place_images(images: list, messages: list[dict]) -> list[dict]:
        """A copy of `messages`; with images but no `<image>` marker, the markers go before the first user
        message's text."""
        messages = [dict(m) for m in messages]
        if images and not any(IMAGE_MARKER in m.get("content", "") for m in messages):
            first = next(i for i, m in enumerate(messages) if m.get("role") == "user")
            messages[first]["content"] = IMAGE_MARKER * len(images) + "\n" + messages[first]["content"]
        return messages

    @torch.no_grad()
    def chat_batch(self, conversations: list[tuple[list, list[dict]]], **gen_kw: Any) -> list[str]:
        """Answer several conversations together: `[(images, messages), ...] -> [reply, ...]`, left-padded
        into one batch (greedy unless `do_sample`). Each reply equals `chat(images, messages)` alone."""
        if not conversations:
            return []
        device = next(self.parameters()).device
        ids_list, inputs = [], {}
        for images, messages in conversations:
            tokens = self.image_tokens(list(images))
            ids_list.append(self.chat_ids(self._place_images(images, messages), len(images), tokens))
            for k, v in self.image_inputs(list(images)).items():  # sample order, each image's crops together
                inputs.setdefault(k, []).append(v)
        width = max(len(x) for x in ids_list)
        pad = self.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids_list], device=device)  # [B, T]
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids_list], device=device)
        image_kw = {k: torch.cat(v).to(device) for k, v in inputs.items()}
        gen_kw.setdefault("max_new_tokens", 128)
        gen_kw.setdefault("stop_token_ids", self.stop_token_ids)
        return [self.decode(new) for new in self.generate(input_ids, mask, **image_kw, **gen_kw)]

    @torch.no_grad()
    def chat(self, images: list, messages: list[dict], **gen_kw: Any) -> str:
        """Answer the last user turn. Images fill the `<image>` markers in order (one is prepended to the
        first user message when there are images but no markers)."""
        messages = self._place_images(images, messages)
        ids = self.chat_ids(messages, len(images), self.image_tokens(list(images)))
        device = next(self.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        image_kw = {k: v.to(device) for k, v in self.image_inputs(list(images)).items()}
        gen_kw.setdefault("max_new_tokens", 128)
        gen_kw.setdefault("stop_token_ids", self.stop_token_ids)
        return self.decode(self.generate(input_ids, torch.ones_like(input_ids), **image_kw, **gen_kw)[0])

    # ----- attention -----------------------------------------------------------------------------------
    def prepare_attention(self, compute_dtype: torch.dtype | None = None) -> str | None:
        """Resolve the LM's attention implementation for its device and dtypes: the LM's weight dtype and
        `compute_dtype` (autocast's) when given. Call it once the model is on its device, before the first
        step or generate, never inside a forward (the GPU self-test runs its own backward). Cheap after the
        first call: the choice is kept per (device, dtype, head dim). Returns what was chosen, per dtype."""
        param = next((p for p in self.lm.parameters() if p.is_floating_point()), None)
        if param is None:
            return None
        dtypes = list(dict.fromkeys(d for d in (param.dtype, compute_dtype) if d is not None))
        return self.backbone.prepare_attention(self.lm, param.device, dtypes)

    # ----- training helpers --------------------------------------------------------------------------
    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable(self.lm)

    def merge_lora(self) -> None:
        """Fold peft LoRA adapters into the LM weights (no-op without adapters); 4-bit (QLoRA) base weights
        are dequantised first, so the adapters fold into float weights and nothing is re-quantised."""
        if has_4bit(self.lm):
            dequantize_lm(self)
        if hasattr(self.lm, "merge_and_unload"):  # a peft model (peft itself is imported only where LoRA is)
            self.lm = self.lm.merge_and_unload()
            if hasattr(self.lm, "peft_config"):
                # peft < 0.19 leaves the adapter config on the unwrapped LM; saving would then write a lora/
                # directory, and loading would wrap the merged weights in fresh adapters.
                del self.lm.peft_config
        self.config.lora = None

    def fold_token_rows(self) -> None:
        """Write trained token rows into the LM's input embedding table and drop them (for merge/export).
        With tied embeddings the output head shares those rows: they change there too."""
        if self.token_rows is None:
            return
        self.token_rows.fold_into(self.backbone.embedding(self.lm))
        self.token_rows = None

    # ----- checkpoints -------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, trainable_only: bool = False) -> None:
        save_vlm(self, out_dir, trainable_only=trainable_only)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> VLM:
        """A saved VLM (our format, a run directory's model, or a transformers Llava directory): `load_vlm`."""
        return load_vlm(path, **overrides)


# ----- building and loading ------------------------------------------------------------------------
def build_vlm(preset_or_config: str | dict | VLMConfig, **overrides: Any) -> VLM:
    """Build every part named by the config (a preset name, a dict or a VLMConfig)."""
    config = resolve_config(preset_or_config, **overrides)
    if config.init_from is not None and _wrapper_family(config.init_from):
        return ReleasedVLM.from_pretrained(config.init_from, dtype=torch_dtype(config.dtype))
    if is_qwenvl_chat_dir(config.init_from):  # Qwen-VL-Chat: our parts, all read from its directory
        config = qwenvl_chat_config(config.init_from, config)
    if config.init_from is not None:
        return _import_llava(config.init_from, config)
    family = LM_BACKBONES[config.lm_backend]
    with named_source(config.lm, "language model (lm)"):
        lm = family.load_lm(config)
    with named_source(config.tokenizer or config.lm, "tokenizer"):
        tokenizer = family.load_tokenizer(config)
    towers = build_towers(config)
    if config.freeze_towers:
        towers.requires_grad_(False)
        towers.eval()
    native = config.max_pixels is not None or getattr(towers, "max_num_patches", None)
    grid = towers.grid if config.reduce is not None and not native else None  # native: grids vary per image
    projector = build_projector(
        config.projector, int(towers.hidden_size), lm_width(lm), reduce=config.reduce,
        reduce_factor=config.reduce_factor, grid=grid,
    )
    vlm = VLM(config, towers, projector, lm, tokenizer)
    vlm = vlm.to(torch_dtype(config.dtype))
    if vlm.token_rows is not None:
        vlm.token_rows.float()  # trained rows keep fp32 master weights
    if config.tower_dtype is not None and config.freeze_towers:
        vlm.cast_frozen_towers()
    return vlm


def load_vlm(path: str | Path, **overrides: Any) -> VLM:
    """A directory written by `VLM.save_pretrained` (rebuilt, then its tensors on top), a run directory (its
    `final/`, else its newest `checkpoint-N/`: `resolve_model_dir`) or a Llava directory."""
    if is_qwenvl_chat_dir(path):  # a released Qwen-VL(-Chat) directory (model/qwenvl_chat.py)
        return build_vlm(qwenvl_chat_config(path, overrides)).eval()
    p = Path(path) if is_llava_next_dir(path) else resolve_model_dir(path)
    if _wrapper_family(p):
        return ReleasedVLM.from_pretrained(p, **overrides).eval()
    if not (p / CONFIG_FILE).is_file():  # resolve_model_dir returns a model directory: ours or a Llava one
        return _import_llava(p, overrides or None).eval()
    config, _ = read_vlm_config(p)
    if (p / TOKENIZER_DIR).is_dir() and "tokenizer" not in overrides:
        config.tokenizer = str(p / TOKENIZER_DIR)
    overrides = dict(overrides)
    tower_path = overrides.pop("tower_path", None)
    if tower_path is not None:
        paths = [tower_path] if isinstance(tower_path, (str, Path)) else list(tower_path)
        if len(paths) != len(config.towers):
            raise UserError(f"tower_path: {len(paths)} path(s) given for {len(config.towers)} tower(s)")
        for spec, tp in zip(config.towers, paths):
            spec["name_or_path"] = str(tp)
    vlm = build_vlm(config, **overrides)
    _quantize_like(vlm, p)
    if (p / LORA_DIR / "adapter_config.json").is_file():
        # peft is heavy (it loads bitsandbytes and parts of inductor): imported only for a LoRA checkpoint.
        from peft import LoraConfig, get_peft_model

        vlm.lm = get_peft_model(vlm.lm, LoraConfig.from_pretrained(str(p / LORA_DIR)))
    load_trainable_weights(vlm, p)
    return vlm.eval()  # inference mode, as transformers' from_pretrained; training calls .train()


def _wrapper_family(path: str | Path) -> bool:
    """A released checkpoint of a family run through model/released.py (not imported into our VLM), or a run's
    model trained from one (its released.json)."""
    if (Path(path) / "released.json").is_file():
        return True
    family = family_of(path)
    return family is not None and not family.native


def _import_llava(path: str | Path, config: VLMConfig | dict | None) -> VLM:
    """A transformers Llava directory as our VLM, its parts mapped by model/llava.py."""
    vconfig, towers, projector, lm, tokenizer, dtype, extras = llava_parts(path, config)
    vlm = VLM(vconfig, towers, projector, lm, tokenizer)
    with torch.no_grad():
        for name, tensor in extras.items():  # LLaVA-NeXT's image_newline
            getattr(vlm, name).copy_(tensor)
    return vlm.to(dtype)


def _quantize_like(vlm: VLM, path: Path) -> None:
    """A QLoRA checkpoint: quantise the rebuilt LM as the run did (the adapters were trained on top of it)."""
    file = path / LORA_DIR / QUANT_FILE
    if not file.is_file():
        return
    settings = json.loads(file.read_text())
    quantize_lm_4bit(vlm, compute_dtype=getattr(torch, settings["compute_dtype"]),
                     quant_type=settings["quant_type"], double_quant=settings["double_quant"])
