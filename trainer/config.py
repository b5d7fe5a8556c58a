"""`TrainConfig`: everything one training run needs, loaded from YAML plus `key=value` overrides.

Keys follow LLaVA's and the Hugging Face Trainer's names (`data_path`, `image_folder`, `learning_rate`,
`per_device_train_batch_size`, ...). Nested sections: `model` (VLMConfig fields, applied over `preset`)
and `lora`. Example: `python train.py configs/demo.yaml stage=sft lora.r=8 model.projector=mlp3x_gelu`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from trainer.config_io import ConfigError, load_config
from trainer.stages import LoraSettings


@dataclass
class TrainConfig:
    # ---- the model -------------------------------------------------------------------------------
    preset: str | None = None  # a name in model.config.PRESETS; `model` keys override it
    model: dict = field(default_factory=dict)  # VLMConfig fields
    init_from: str | None = None  # a run / model directory to start from (e.g. stage 2 from stage 1)
    # ---- data (LLaVA names) ----------------------------------------------------------------------
    data_path: list[str] = field(default_factory=list)
    data_weights: list[float] | None = None  # sampling weight per data_path entry
    image_folder: str | None = None
    video_folder: str | None = None
    eval_data_path: list[str] | None = None
    data_mode: Literal["chat", "plain"] = "chat"
    max_length: int = 2048
    frames_per_video: int = 8
    system_prompt: str | None = None
    strict_data: bool = False  # raise on a bad sample instead of skipping it
    allow_absolute_paths: bool = False  # True lets data files name any absolute path (trusted data only)
    max_pixels: int = 64 * 1024 * 1024  # images above this many pixels are refused (decompression bombs)
    dataloader_num_workers: int = 0
    group_by_length: bool = True
    validate_data: bool = True  # pre-scan the data (render + image headers) before training
    # Several samples per row up to max_length, attention isolated per sample (qwen LM only);
    # per_device_train_batch_size then counts packs. See dataset/packing.py.
    packing: bool = False
    # A directory written by `python -m dataprocess.cache_features`: cached tower outputs replace the
    # images (frozen towers only, e.g. stage 1). See dataset/feature_cache.py.
    feature_cache: str | None = None
    # ---- what trains -----------------------------------------------------------------------------
    stage: Literal["align", "sft", "full"] = "sft"
    freeze: list[str] = field(default_factory=list)
    unfreeze: list[str] = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # ---- optimisation ----------------------------------------------------------------------------
    learning_rate: float = 2e-4  # the LM / LoRA group
    projector_lr: float | None = None  # None -> learning_rate
    vision_lr: float = 0.0  # > 0 trains the towers
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # When set, gradient_accumulation_steps = global_batch_size / (per_device * world_size), so the global
    # batch stays the same whatever the number of processes.
    global_batch_size: int | None = None
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # Speed (trainer/speed.py): glibc keeps freed memory on a CPU; the qwen LM's fused-op implementation
    # (torch | triton | compile | auto; "keep" leaves the model's own, torch) and torch.compile of its
    # blocks (both opt-in: see docs/benchmarks.md).
    retain_freed_memory: bool = True
    fused_impl: str = "keep"
    compile_lm: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it
    seed: int = 42
    # ---- the run ---------------------------------------------------------------------------------
    output_dir: str = "runs/default"
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 3
    eval_steps: int | None = None
    resume_from_checkpoint: str | None = None  # "auto" or a checkpoint path
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    deepspeed: str | None = None
    fsdp: str = ""
    fsdp_config: str | None = None
    save_full_model: bool = False  # the final model with every weight, not only the trainable ones
    ddp_timeout: int = 1800  # seconds a collective may wait before a stuck rank fails the run
    # ---- faults ----------------------------------------------------------------------------------
    max_consecutive_nan: int = 5  # this many non-finite steps in a row stop the run (after a checkpoint)
    check_disk_space: bool = True  # refuse to start when one checkpoint would not fit on the disk
    debug_inject_nan_steps: list[int] = field(default_factory=list)  # testing: these steps get a NaN loss

    def validate(self) -> None:
        if not self.data_path:
            raise ConfigError("data_path is empty: give one or more JSON/JSONL files")
        # torchrun sets WORLD_SIZE: a global batch that the processes cannot split fails here, before any work.
        self.accumulation_steps(int(os.environ.get("WORLD_SIZE", "1")))
        if self.data_weights is not None and len(self.data_weights) != len(self.data_path):
            raise ConfigError(
                f"data_weights has {len(self.data_weights)} entries but data_path has {len(self.data_path)}"
            )
        if self.stage == "sft" and self.lora.r <= 0 and not self.unfreeze:
            raise ConfigError("stage=sft needs lora.r > 0 (or use stage=full / unfreeze regexes)")
        if self.lora.qlora and self.stage != "sft":
            raise ConfigError("lora.qlora=true only applies to stage=sft")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.max_consecutive_nan < 1:
            raise ConfigError(f"max_consecutive_nan must be >= 1, got {self.max_consecutive_nan}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")
        self.vlm_config()  # unknown model keys / presets fail here, before anything is built

    def accumulation_steps(self, world_size: int) -> int:
        """Gradient accumulation for `world_size` processes: derived from global_batch_size when it is set."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = self.per_device_train_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not a multiple of per_device_train_batch_size="
                f"{self.per_device_train_batch_size} x {world_size} process(es) = {per_step}"
            )
        return self.global_batch_size // per_step

    def vlm_config(self):
        from model.config import resolve_config

        if self.init_from is not None and not self.preset and not self.model:
            return None  # the model comes whole from init_from
        try:
            return resolve_config(self.preset or {}, **self.model)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    cfg = load_config(TrainConfig, path, overrides)
    cfg.validate()
    return cfg
