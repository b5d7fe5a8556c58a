"""transformers vision towers: CLIPVisionModel, SiglipVisionModel and Siglip2VisionModel.

`name_or_path` is a hub id or a local directory as `save_pretrained` writes it (config.json +
model.safetensors, optionally preprocessor_config.json). A full CLIPModel / SiglipModel checkpoint loads too
(the text tower is ignored). Hidden states are transformers' own `output_hidden_states` tuple
(0 = embedding output after CLIP's pre-LayerNorm, i = after encoder layer i).
- CLIP: has_cls=True, one CLS token first.  SigLIP / SigLIP2: has_cls=False, every token is a patch.
- SigLIP2 in fixed mode is used at ONE square resolution: the tower patchifies [N, 3, S, S] itself and
  passes an all-ones patch mask and spatial shape (S/p, S/p); S defaults to sqrt(config.num_patches) * p.
Native resolution (`forward_grid`, visual/native.py's batch contract; visual/base.py):
- SigLIP2 NaFlex: the images' patches are packed into transformers' padded [n_images, max_num_patches,
  p*p*3] (each patch flattened (py, px, channel) as Siglip2ImageProcessor does) with `pixel_attention_mask`
  and `spatial_shapes` = image_grid; the model resizes its position embeddings per image and masks the
  padding out of attention; the valid rows come back in order. `max_num_patches` is a tower spec key,
  by default the checkpoint's preprocessor_config.json value (else 256, transformers' default); an image
  of more patches is an error.
- CLIP / SigLIP (Qwen2-VL-style native resolution): each image runs at its own (H, W) = grid * p with
  `interpolate_pos_encoding=True` (position embeddings bicubically resized to the grid); images of one grid
  run as one batch. CLIP's CLS row is dropped.
`last_hidden_state=True` takes the model's `last_hidden_state` output instead of
`hidden_states[feature_layer]` (then `feature_layer` must be the last layer, -1): for SigLIP that is the last
block after its post-LayerNorm, for CLIP the last block as is. Off by default; it is what the BigBro repo fed
its projector (with `select="drop_first"`), so its imported checkpoints use it (model/bigbro.py).
Preprocessing facts come from preprocessor_config.json when present, else from the family's defaults.
`pretrained=False` builds random weights from the config alone (`name_or_path` may then be a config.json
file, e.g. `configs/hub/google--siglip-so400m-patch14-384.json`): memory plans and real-shape smoke runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import transformers
from transformers.utils import cached_file

from .base import VisionTower, resolve_layer
from .native import run_by_grid
from .processor import ImageProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


def read_preprocessor_config(name_or_path: str) -> dict:
    """preprocessor_config.json of a hub id / local dir as a dict; {} when the checkpoint has none."""
    path = cached_file(
        name_or_path,
        "preprocessor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def processor_from_hf(pp: dict, image_size: int, mean, std, mode: str, resample) -> ImageProcessor:
    """Size/mean/std/resample from a transformers image-processor config; `image_size` is the model's."""
    size = pp.get("crop_size") or pp.get("size") or {}
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or image_size
    if int(size) != image_size:
        raise ValueError(
            f"preprocessor_config.json size {size} differs from the model's image_size {image_size}"
        )
    return ImageProcessor(
        size=image_size,
        mean=pp.get("image_mean", mean),
        std=pp.get("image_std", std),
        mode=mode,
        resample=resample if resample is not None else pp.get("resample", "bicubic"),
    )


class HFTower(VisionTower):
    """Shared loading for transformers towers; subclasses set the class and the CLS fact."""

    model_class_name = ""
    model_types: tuple[str, ...] = ()  # config.json model_type values this backend accepts
    has_cls_token = False
    default_mean, default_std = HALF, HALF

    def __init__(
        self,
        name_or_path: str,
        feature_layer: int | None = None,
        select: str = "patch",
        image_mode: str = "pad",
        dtype: torch.dtype | None = None,
        resample: str | int | None = None,
        pretrained: bool = True,
        last_hidden_state: bool = False,
        **load_kw,
    ) -> None:
        model_type = transformers.PretrainedConfig.get_config_dict(name_or_path)[0].get("model_type")
        if model_type not in self.model_types:
            raise ValueError(
                f"{name_or_path}: config.json has model_type={model_type!r}, but backend {self.backend!r} "
                f"loads {sorted(self.model_types)}"
            )
        cls = getattr(transformers, self.model_class_name)
        if not pretrained:
            # Random weights from the config alone (a config.json directory or file): plans and smoke runs.
            model = cls._from_config(cls.config_class.from_pretrained(name_or_path, **load_kw), dtype=dtype)
            info = {}
        else:
            model, info = cls.from_pretrained(name_or_path, dtype=dtype, output_loading_info=True, **load_kw)
        if info.get("missing_keys"):
            # A silently random-initialised tower would train on noise: refuse it.
            raise ValueError(
                f"{name_or_path}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:8]}"
            )
        cfg = model.config
        image_size = self._image_size(cfg)
        grid = image_size // cfg.patch_size
        n_states = cfg.num_hidden_layers + 1
        pp = {} if Path(name_or_path).is_file() else read_preprocessor_config(name_or_path)
        processor = processor_from_hf(
            pp,
            image_size,
            self.default_mean,
            self.default_std,
            image_mode,
            resample,
        )
        super().__init__(
            name=str(name_or_path),
            hidden_size=cfg.hidden_size,
            grid=(grid, grid),
            has_cls=self.has_cls_token,
            num_prefix=int(self.has_cls_token),
            feature_layer=resolve_layer(
                -2 if feature_layer is None else feature_layer, n_states, name_or_path
            ),
            select=select,
            processor=processor,
        )
        self.model = model
        self.patch_size = int(cfg.patch_size)
        self.hf_preprocessor = pp  # preprocessor_config.json as read ({} when none)
        self.last_hidden_state = bool(last_hidden_state)
        if self.last_hidden_state and self.feature_layer != n_states - 1:
            raise ValueError(f"{name_or_path}: last_hidden_state=true is the last layer's output; "
                             f"feature_layer must be -1, got {feature_layer}")

    def _image_size(self, cfg) -> int:
        return int(cfg.image_size)

    def _model_inputs(self, pixel_values: torch.Tensor) -> dict:
        return {"pixel_values": pixel_values}

    def gradient_checkpointing_enable(self) -> None:
        super().gradient_checkpointing_enable()
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.23 has it under its older name only
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def _hidden_state(self, pixel_values: torch.Tensor, **extra) -> torch.Tensor:
        return self._select_state(self.model(**self._model_inputs(pixel_values), **extra,
                                             output_hidden_states=not self.last_hidden_state))

    def _select_state(self, out) -> torch.Tensor:
        if self.last_hidden_state:  # SigLIP: after the post-LayerNorm (the BigBro repo's features)
            return out.last_hidden_state  # [N, prefix + h*w, D]
        return out.hidden_states[self.feature_layer]  # [N, prefix + h*w, D]

    def _grid_hidden(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        """Each image at its own (H, W) with interpolated position embeddings; one call per distinct grid."""
        run = lambda images: self._hidden_state(images, interpolate_pos_encoding=True)  # noqa: E731
        return run_by_grid(pixel_values, image_grid, run, self.num_prefix)  # [n_patches_total, D]


class HFCLIPTower(HFTower):
    backend = "hf_clip"
    model_class_name = "CLIPVisionModel"
    model_types = ("clip", "clip_vision_model")
    has_cls_token = True  # CLIP prepends one class embedding
    variable_grid = True
    default_mean, default_std = CLIP_MEAN, CLIP_STD


class HFSiglipTower(HFTower):
    backend = "hf_siglip"
    model_class_name = "SiglipVisionModel"
    model_types = ("siglip", "siglip_vision_model")
    has_cls_token = False  # SigLIP has no CLS: dropping token 0 would drop a real patch
    variable_grid = True


class HFSiglip2Tower(HFTower):
    backend = "hf_siglip2"
    model_class_name = "Siglip2VisionModel"
    model_types = ("siglip2", "siglip2_vision_model")
    has_cls_token = False
    variable_grid = True

    def __init__(self, name_or_path: str, *args, max_num_patches: int | None = None, **kw) -> None:
        super().__init__(name_or_path, *args, **kw)
        if max_num_patches is None:  # the checkpoint's processor value, else Siglip2ImageProcessor's default
            max_num_patches = self.hf_preprocessor.get("max_num_patches") or 256
        self.max_num_patches = int(max_num_patches)
        if self.max_num_patches < 1:
            raise ValueError(f"{name_or_path}: max_num_patches must be >= 1, got {max_num_patches}")

    def _image_size(self, cfg) -> int:
        side = math.isqrt(cfg.num_patches)
        assert side * side == cfg.num_patches, f"SigLIP2 num_patches={cfg.num_patches} is not a square"
        return side * cfg.patch_size

    def _model_inputs(self, pixel_values: torch.Tensor) -> dict:
        n, c, h, w = pixel_values.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        # Same patch layout as Siglip2ImageProcessor: row-major patches, each flattened as (py, px, channel).
        patches = (
            pixel_values.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * c)
        )
        mask = torch.ones(n, gh * gw, dtype=torch.long, device=pixel_values.device)
        shapes = torch.tensor([[gh, gw]] * n, dtype=torch.long, device=pixel_values.device)
        return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}

    def _grid_hidden(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        """Pack into transformers' padded NaFlex batch, run it once, unpad."""
        counts = image_grid[:, 0] * image_grid[:, 1]  # [n_images]
        n, length, p = image_grid.shape[0], self.max_num_patches, self.patch_size
        if n and int(counts.max()) > length:
            raise ValueError(f"{self.name}: an image of {int(counts.max())} patches is over max_num_patches="
                             f"{length}; resize it with Resolution(mode='naflex', max_num_patches={length})")
        flat = pixel_values.permute(0, 2, 3, 1).reshape(-1, p * p * 3)  # [P, p*p*3], (py, px, channel)
        valid = torch.arange(length, device=flat.device)[None] < counts.to(flat.device)[:, None]  # [n, L]
        packed = flat.new_zeros(n, length, p * p * 3)
        packed[valid] = flat  # row-major over (image, position): image i's patches fill its first rows
        out = self.model(pixel_values=packed, pixel_attention_mask=valid.long(),
                         spatial_shapes=image_grid.to(flat.device), output_hidden_states=not self.last_hidden_state)
        return self._select_state(out)[valid]  # [P, D]
