"""`TrainConfig`: everything one training run needs, loaded from YAML plus `key=value` overrides.

Keys follow LLaVA's and the Hugging Face Trainer's names (`data_path`, `image_folder`, `learning_rate`,
`per_device_train_batch_size`, ...). Nested sections: `model` (VLMConfig fields, applied over `preset`)
and `lora`. Example: `python train.py configs/demo/stage2_sft.yaml stage=sft lora.r=8 model.projector=mlp3x_gelu`.

It lives in model/, below the trainer, because the memory and compute plan (model/plan.py) reads the same
config as the run it models, and what trains (`model/stages.py`, `LoraSettings`) is decided from it; the
trainer (trainer/run.py) and train.py import it from here. `eval_tasks` entries are checked by evaluation/
(`evaluation.during_training.check_eval_tasks`), which train.py calls after `load_train_config`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..core.config_io import ConfigError, load_config
from .paths import resolve_model_dir


@dataclass
class LoraSettings:
    r: int = 0  # LoRA rank (0 = no adapters)
    alpha: int = 16  # LoRA scaling numerator (the update is scaled by alpha / r)
    dropout: float = 0.05  # dropout on the adapters' input
    # Module-name suffixes joined by "|"; "" = the LM backbone's default (Qwen: every Linear of the block,
    # c_attn|attn.c_proj|w1|w2|mlp.c_proj; Llama-like: q/k/v/o/gate/up/down_proj); "all-linear" = every
    # Linear of the LM but its output head.
    targets: str = ""
    qlora: bool = False  # 4-bit NF4 base weights under the adapters (bitsandbytes)


@dataclass
class TrainConfig:
    # ---- the model -------------------------------------------------------------------------------
    preset: str | None = None  # a name in model.model.PRESETS; `model` keys override it
    model: dict = field(default_factory=dict)  # VLMConfig fields
    init_from: str | None = None  # a run / model directory to start from (e.g. stage 2 from stage 1)
    # ---- data (LLaVA names) ----------------------------------------------------------------------
    # training data: one or more JSON / JSONL files (every supported record format)
    data_path: list[str] = field(default_factory=list)
    data_weights: list[float] | None = None  # sampling weight per data_path entry
    image_folder: str | None = None  # folder the data's image paths are relative to
    video_folder: str | None = None  # folder the data's video paths are relative to (default: image_folder)
    eval_data_path: list[str] | None = None  # held-out data files: eval loss every eval_steps
    # chat (conversations) or plain (stage-1 captions: image spans + caption)
    data_mode: Literal["chat", "plain"] = "chat"
    # tokens per sample, image tokens included; longer samples lose whole trailing turns (counted)
    max_length: int = 2048
    frames_per_video: int = 8  # frames sampled from each video (each is one image span)
    system_prompt: str | None = None  # a system message for samples without one (none by default)
    strict_data: bool = False  # raise on a bad sample instead of skipping it
    allow_absolute_paths: bool = False  # True lets data files name any absolute path (trusted data only)
    max_pixels: int = 64 * 1024 * 1024  # images above this many pixels are refused (decompression bombs)
    dataloader_num_workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    group_by_length: bool = True  # batch samples of similar length together (less padding)
    validate_data: bool = True  # pre-scan the data (render + image headers) before training
    # Padding-free rows, attention isolated per sample (qwen LM only; dataset/packing.py):
    # "samples": each micro-batch's samples back to back in ONE row: the same samples per step as padding,
    #   no padding tokens, losses equal padded;
    # true: several samples per row up to max_length; per_device_train_batch_size then counts packs.
    packing: bool | Literal["samples"] = False
    # A directory written by `python -m qwenvl_lab.dataprocess.cache_features`: cached tower outputs replace the
    # images (frozen towers only, e.g. stage 1). See dataset/feature_cache.py.
    feature_cache: str | None = None
    # image tokens per sample, over all its images and video frames (null = no budget; the variable
    # resolution modes give each image its own count; dataset/layouts.py)
    max_image_tokens: int | None = None
    # image tokens per micro-batch (null = no budget): each sample (packing: each pack) is held to this /
    # per_device_train_batch_size (trainer/run.py build_datasets)
    max_batch_image_tokens: int | None = None
    # a sample over budget: downscale (all its images by one common factor, counted) or skip (counted as
    # image_budget); a fixed resolution cannot be downscaled, so it always skips
    over_budget: Literal["downscale", "skip"] = "downscale"
    # ---- what trains -----------------------------------------------------------------------------
    # align (projector only), sft (projector + LoRA), full (projector + whole LM), dpo (preference tuning of
    # what sft trains: pairs of chosen/rejected answers, trainer/pref_trainer.py)
    stage: Literal["align", "sft", "full", "dpo"] = "sft"
    # ---- preference tuning (stage dpo; the formulas are in trainer/pref_loss.py) ----------------------------
    pref_loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = "sigmoid"  # sigmoid = DPO; simpo, orpo need no reference
    beta: float = 0.1  # DPO / SimPO temperature, IPO's tau, ORPO's lambda (weight of the odds-ratio term)
    label_smoothing: float = 0.0  # probability a preference label is flipped (conservative DPO, SimPO), in [0, 0.5)
    rpo_alpha: float = 0.0  # weight of an NLL term on the chosen answers added to sigmoid / ipo / simpo (RPO)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    # the reference's log-probs computed once before the first step and kept by pair id (reference_logps.json in
    # output_dir); the steps then run no reference forward
    precompute_ref_logps: bool = False
    # regexes of parameter names to freeze after the stage rule
    freeze: list[str] = field(default_factory=list)
    # regexes of parameter names to train after the stage rule (applied after freeze)
    unfreeze: list[str] = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # ---- optimisation ----------------------------------------------------------------------------
    learning_rate: float = 2e-4  # the LM / LoRA group
    projector_lr: float | None = None  # None -> learning_rate
    vision_lr: float = 0.0  # > 0 trains the towers
    weight_decay: float = 0.0  # AdamW weight decay (never on biases and norms)
    warmup_ratio: float = 0.03  # fraction of the run spent warming the learning rate up
    lr_scheduler_type: str = "cosine"  # the Trainer's schedule name (cosine, linear, constant, ...)
    num_train_epochs: float = 1.0  # passes over the data (max_steps wins when > 0)
    max_steps: int = -1  # optimizer steps to run (-1 = num_train_epochs)
    per_device_train_batch_size: int = 8  # samples (or packs, with packing) per process per micro-batch
    per_device_eval_batch_size: int = 8  # samples per process per evaluation batch
    # micro-batches per optimizer step (derived from global_batch_size when set)
    gradient_accumulation_steps: int = 1
    # When set, gradient_accumulation_steps = global_batch_size / (per_device * world_size), so the global
    # batch stays the same whatever the number of processes.
    global_batch_size: int | None = None
    max_grad_norm: float = 1.0  # gradient clipping norm
    # recompute activations in backward (less memory, about a third more compute)
    gradient_checkpointing: bool = False
    # Speed (trainer/speed_settings.py; the two LM keys are opt-in, measured in docs/benchmarks.md):
    retain_freed_memory: bool = True  # on a CPU, glibc keeps freed memory for reuse (no page faults)
    # qwen LM's RMSNorm / rotary / SwiGLU: torch | triton | compile | auto; keep = the model's own (torch)
    fused_impl: str = "keep"
    compile_lm: bool = False  # torch.compile the qwen LM's decoder blocks (eager again if it fails)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it
    seed: int = 42  # seed of the model init, data order and dropout
    # ---- the run ---------------------------------------------------------------------------------
    # the run directory (config, checkpoints, final model, logs, data report)
    output_dir: str = "runs/default"
    logging_steps: int = 10  # log every this many optimizer steps
    save_steps: int = 500  # save a checkpoint every this many optimizer steps
    save_total_limit: int | None = 3  # keep at most this many checkpoints (null = all)
    eval_steps: int | None = None  # evaluate eval_data_path every this many steps (null = never)
    # Benchmarks answered every eval_steps: [{task, data, images, limit}, ...] (evaluation/during_training.py).
    eval_tasks: list[dict] = field(default_factory=list)
    resume_from_checkpoint: str | None = None  # "auto" or a checkpoint path
    # loggers: tensorboard, wandb, or [] for none
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    deepspeed: str | None = None  # a DeepSpeed JSON config (configs/engines/zero2.json, zero3.json)
    fsdp: bool | str = ""  # true (configured by fsdp_config), or transformers' legacy string form
    fsdp_config: str | None = None  # an FSDP JSON config (configs/engines/fsdp.json)
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
        if self.stage in ("sft", "dpo") and self.lora.r <= 0 and not self.unfreeze:
            raise ConfigError(f"stage={self.stage} needs lora.r > 0 (or use stage=full / unfreeze regexes)")
        if self.stage == "dpo":
            self.validate_preference()
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

    def validate_preference(self) -> None:
        """The keys of stage dpo, and the ones it does not support yet (one line each)."""
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.pref_loss in ("ipo", "orpo"):
            raise ConfigError(f"label_smoothing applies to pref_loss sigmoid / simpo, not {self.pref_loss}")
        if self.precompute_ref_logps and self.pref_loss in ("simpo", "orpo"):
            raise ConfigError(f"precompute_ref_logps: pref_loss={self.pref_loss} uses no reference; leave it false")
        if self.rpo_alpha < 0 or (self.rpo_alpha and self.pref_loss == "orpo"):
            raise ConfigError("rpo_alpha must be >= 0, and 0 with pref_loss=orpo (ORPO has its own NLL term)")
        asked = {"packing": self.packing, "feature_cache": bool(self.feature_cache), "deepspeed": bool(self.deepspeed),
                 "fsdp": bool(fsdp_flag(self.fsdp)), "lora.qlora": self.lora.qlora,
                 "data_mode=plain": self.data_mode == "plain"}
        for key, on in asked.items():
            if on:
                raise ConfigError(f"{key}: not supported with stage=dpo yet; leave it at its default")

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
        # lazily: torch loads only when a config is validated, not for --help
        from .model import resolve_config

        if self.init_from is not None and not self.preset and not self.model:
            return None  # the model comes whole from init_from
        try:
            return resolve_config(self.preset or {}, **self.model)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None


def fsdp_flag(value: bool | str) -> bool | str:
    """`fsdp=true` (YAML bool or string) turns FSDP on; `false`/empty turns it off; other strings (the
    Trainer's FSDP options) pass on."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("true", "1", "yes"):
        return True
    return False if text in ("", "false", "0", "no") else value


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_paths(cfg: TrainConfig) -> None:
    """Paths a run reads or writes, checked before anything heavy loads (no file is created here): the
    data files exist, the image folder too, init_from holds a model, output_dir can be made and written,
    and the optional packages the config's keys need are installed."""
    for key in ("data_path", "eval_data_path"):
        for p in getattr(cfg, key) or []:
            if not Path(p).is_file():
                raise ConfigError(f"{key}: {p}: data file not found")
    for key in ("image_folder", "video_folder"):
        folder = getattr(cfg, key)
        if folder and not Path(folder).is_dir():
            raise ConfigError(f"{key}: {folder} is not a directory")
    if cfg.init_from:
        resolve_model_dir(cfg.init_from)
    out = Path(cfg.output_dir).resolve()
    base = nearest_existing(out)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {cfg.output_dir} cannot be made: {base} is "
                          f"{'not a directory' if not base.is_dir() else 'not writable'}; choose another path")
    check_optional_packages(cfg)


# Optional packages a config key needs: (key, is it on?, import name, what to install).
def _optional_needs(cfg: TrainConfig) -> list[tuple[str, bool, str, str]]:
    return [
        ("deepspeed", bool(cfg.deepspeed), "deepspeed", "pip install '.[deepspeed]'"),
        ("lora.qlora", bool(cfg.lora.qlora), "bitsandbytes", "pip install '.[qlora]'"),
    ]


def check_optional_packages(cfg: TrainConfig) -> None:
    """A key that needs an optional package which is not installed fails here, naming both (nothing is
    imported: `find_spec` only looks the package up)."""
    for key, on, module, install in _optional_needs(cfg):
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key} needs the {module} package, which is not installed: {install} "
                              f"(or remove {key} from the config)")


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    cfg = load_config(TrainConfig, path, overrides)
    cfg.validate()
    return cfg
