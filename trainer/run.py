"""One training run, start to finish: `train(cfg, callbacks=()) -> RunResult`.

The run directory (`output_dir`) holds
  config.yaml           the resolved TrainConfig
  checkpoint-N/         trainable weights (safetensors) + optimizer/scheduler/RNG state (safetensors+JSON)
  final/                the trained model, loadable with `VLM.from_pretrained(output_dir/final)`
  log.jsonl, runs/      the Trainer's log lines (JSONL, TensorBoard)
  loss.png              the loss curve
  data_report.json      every skipped sample (all ranks) with its reason, and the skipped NaN steps

Multi-process (torchrun): only rank 0 writes into the run directory. `global_batch_size` fixes the batch
per optimizer step whatever the number of processes (gradient accumulation is derived from it).
Before the first step: the run directory must be writable and (`check_disk_space`) its disk must hold one
more checkpoint plus the final weights; stale `checkpoint-N.tmp-*` directories of a killed save are removed.
A run stopped by `max_consecutive_nan` raises `TrainingAborted` after saving a checkpoint.
`callbacks`: factories `(cfg, trainer, output_dir) -> [TrainerCallback, ...]` called once the Trainer is built,
for what lives above the trainer: train.py passes `evaluation.during_training.eval_task_callbacks` (benchmarks
every `eval_steps`, logged like the loss); a config with `eval_tasks` and no factory is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainingArguments, set_seed

from ..core.cli import writable_dir
from ..core.config_io import ConfigError, save_config
from ..core.errors import UserError
from ..dataset import Collator, LengthGroupedSampler, VLMDataset
from ..dataset.feature_cache import (
    FeatureCache,
    FeatureCacheMismatch,
    refuse_variable_resolution,
    tower_identity,
)
from ..dataset.hf_chat import ReleasedDataset, released_collate
from ..dataset.layouts import sample_image_budget
from ..dataset.packing import PackedDataset, PackingCollator, PackingSampler
from ..model import VLM, build_vlm, dtypes
from ..model.backbones import unwrap
from ..model.checkpoint import _select_keys
from ..model.paths import resolve_model_dir
from ..model.released import ReleasedVLM
from ..model.stages import adapters_match, apply_stage
from ..model.train_config import TrainConfig, check_paths, fsdp_flag
from ..visual.pixels import prepare_images
from .callbacks import AttentionSetup, JsonlLogger, plot_loss
from .checkpoints import TMP_MARK, is_complete, latest_checkpoint, make_tmp_dir, remove_stale_tmp
from .engines import prepare_deepspeed_on_cpu
from .hf_trainer import VLMTrainer, gather_objects
from .pref_trainer import PairBatches, PrefTrainer, build_pref_datasets
from .speed_settings import apply_speed_settings
from .throughput import ThroughputCallback

log = logging.getLogger("qwenvl_lab.trainer")


# What `train(cfg, callbacks=...)` takes: (config, the Trainer, the run directory) -> the callbacks to add.
CallbackFactory = Callable[[TrainConfig, VLMTrainer, Path], list]


class TrainingAborted(UserError, RuntimeError):
    """The run stopped itself (too many non-finite steps in a row); the last checkpoint is usable."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _setup_logging(out: Path, rank0: bool) -> None:
    level = logging.INFO if rank0 else logging.WARNING
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(level)
    handlers: list[logging.Handler] = [console]
    if rank0:
        handlers.append(logging.FileHandler(out / "train.log", encoding="utf-8"))  # DEBUG and up
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    # Our own loggers also write DEBUG detail (e.g. every module's trainable state) to train.log.
    for name in ("qwenvl_lab.trainer", "qwenvl_lab.model", "qwenvl_lab.dataset"):
        logging.getLogger(name).setLevel(logging.DEBUG if rank0 else logging.WARNING)
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def checkpoint_bytes(vlm) -> int:
    """About the size of one checkpoint: the saved weights plus AdamW's two moments per trainable weight."""
    moments = 2 * sum(p.numel() * p.element_size() for p in vlm.parameters() if p.requires_grad)
    if isinstance(vlm, ReleasedVLM):  # it saves exactly its trainable tensors
        return moments * 3 // 2
    state = vlm.state_dict()
    weights = sum(state[k].numel() * state[k].element_size() for k in _select_keys(vlm, trainable_only=True))
    return weights + moments


def preflight_disk_space(out: Path, vlm) -> None:
    """Fail before training when the disk cannot take one more checkpoint and the final weights."""
    need = int(checkpoint_bytes(vlm) * 1.5) + (16 << 20)  # + final weights (< half) + configs/tokenizer
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(
            f"output_dir {out}: {free / 2**20:.1f} MiB free on its disk, but one checkpoint plus the final "
            f"weights need about {need / 2**20:.1f} MiB; free some space, point output_dir elsewhere, or set "
            f"check_disk_space=false"
        )


def resolve_resume(cfg: TrainConfig, out: Path) -> str | None:
    """`auto` -> the newest complete checkpoint in the run directory (or None); a path is checked."""
    value = cfg.resume_from_checkpoint
    if value in (None, "", "none", "false"):
        return None
    if value == "auto":
        found = latest_checkpoint(out)
        log.info("resume_from_checkpoint=auto -> %s", found or "no checkpoint, starting fresh")
        return str(found) if found else None
    if not Path(value).is_dir():
        raise UserError(f"resume_from_checkpoint: {value} is not a directory (give a checkpoint-N directory "
                        f"or `auto`)")
    if TMP_MARK in Path(value).name or not is_complete(Path(value)):
        raise UserError(f"resume_from_checkpoint: {value} is an unfinished checkpoint (no "
                                f"trainer_state.json or model.safetensors); use an earlier one or `auto`")
    return value


def precision_flags(cfg: TrainConfig) -> dict:
    """Autocast flags for the Trainer. `auto`: bf16 exactly where `dtype: auto` picks bf16 (a GPU or CPU
    with native bf16); bf16 on a CPU needs AMX / AVX512-BF16 (emulated bf16 is ~25x slower than fp32)."""
    p = cfg.precision
    if p == "auto":
        p = "bf16" if dtypes.auto_decision().dtype == torch.bfloat16 else "fp32"
    if p == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision=fp16 needs a GPU here; use precision=fp32 (or auto) on a CPU")
    if p == "bf16" and not torch.cuda.is_available() and not (cpu := dtypes.cpu_native_bf16())[0]:
        raise ConfigError(f"precision=bf16 on this CPU: {cpu[1]}; use precision=fp32 (or auto)")
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def build_model(cfg: TrainConfig):
    """The VLM for this run, with the stage's trainable set applied (and LoRA when asked)."""
    if cfg.init_from:
        vlm = VLM.from_pretrained(resolve_model_dir(cfg.init_from))
        if cfg.model or cfg.preset:
            log.warning("init_from=%s: the model/preset keys are ignored", cfg.init_from)
    else:
        try:
            vlm = build_vlm(cfg.vlm_config())
        except ValueError as e:  # the parts do not fit together (e.g. a grid the reduction cannot split)
            raise ConfigError(f"model: {e}") from None
    lora = cfg.lora
    if cfg.stage in ("sft", "dpo") and cfg.lora.r > 0 and getattr(vlm.lm, "peft_config", None):
        lora = continue_or_fold_adapters(cfg, vlm)
    moved = apply_stage(vlm, cfg, lora, check=lambda m: check_optimisation_keys(cfg, m))
    log.info("parameter dtypes and bytes per part (%d trainable tensors moved to fp32):\n%s", moved,
             dtypes.describe_parts(vlm))
    if cfg.gradient_checkpointing:
        vlm.gradient_checkpointing_enable()
    warn_max_length(cfg, vlm)
    return vlm


def continue_or_fold_adapters(cfg: TrainConfig, vlm):
    """init_from's LoRA adapters: trained on when lora.r / lora.targets name them (returns settings that add
    none); else folded into the LM under fresh ones, which only a full final model keeps (save_full_model:
    a trainable-only checkpoint points at the base LM, without the folded weights)."""
    if cfg.stage == "dpo":
        return fold_sft_adapters(cfg, vlm)
    if adapters_match(vlm, cfg.lora):
        a = vlm.lm.peft_config["default"]
        log.info("init_from=%s: its LoRA adapters (r=%d, alpha=%d) train on", cfg.init_from, a.r, a.lora_alpha)
        return dataclasses.replace(cfg.lora, r=0)  # no second set: set_trainable trains the `lora_` tensors
    if not cfg.save_full_model:
        a = vlm.lm.peft_config["default"]
        raise ConfigError(f"init_from={cfg.init_from} holds LoRA adapters (r={a.r}) that lora.r={cfg.lora.r} / "
                          f"lora.targets={cfg.lora.targets!r} do not name: give its rank and targets to train them "
                          f"on, or set save_full_model=true to fold them into the LM under fresh ones")
    vlm.merge_lora()  # fold them in; apply_stage adds fresh ones; the full final model keeps both
    return cfg.lora


def fold_sft_adapters(cfg: TrainConfig, vlm):
    """Stage dpo from a model with LoRA adapters (an SFT run): they are folded into the LM first, so the
    reference (the model with its adapters off) is that SFT model and not the base LM under it."""
    a = vlm.lm.peft_config["default"]
    if not cfg.save_full_model:
        raise ConfigError(f"init_from={cfg.init_from} holds LoRA adapters (r={a.r}): stage=dpo folds them into the LM "
                          f"so that the reference is that model; set save_full_model=true so the final model keeps "
                          f"them (a trainable-only one would point at the LM without them)")
    log.info("init_from=%s: its LoRA adapters (r=%d) folded into the LM; the reference is that model", cfg.init_from,
             a.r)
    vlm.merge_lora()
    return cfg.lora


def warn_max_length(cfg: TrainConfig, vlm) -> None:
    """max_length above the LM's position range trains positions the LM never saw (or cannot embed)."""
    max_pos = getattr(unwrap(vlm.lm).config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and cfg.max_length > max_pos:
        log.warning("max_length=%d is above the LM's max_position_embeddings=%d (%s): samples that long go past "
                    "the positions it was trained on; lower max_length unless the LM extends its context",
                    cfg.max_length, max_pos, getattr(vlm.config, "lm", None) or getattr(vlm, "source", "the LM"))

def check_optimisation_keys(cfg: TrainConfig, vlm) -> None:
    """`packing` needs the qwen LM; `feature_cache` needs frozen towers and a cache written by them."""
    if isinstance(vlm, ReleasedVLM):
        return refuse_for_released(cfg, vlm)
    if cfg.packing and vlm.config.lm_backend != "qwen":
        raise ConfigError(f"packing={str(cfg.packing).lower()} needs model.lm_backend=qwen (variable-length attention); this LM "
                          f"is {vlm.config.lm_backend!r}: set packing=false")
    if cfg.feature_cache:
        refuse_variable_resolution(getattr(vlm, "resolution", None))  # one count per image only
        if any(p.requires_grad for p in vlm.towers.parameters()):
            raise ConfigError("feature_cache is only valid with frozen towers (vision_lr=0 and no unfreeze regex "
                              "on towers): cached features cannot follow a tower that trains")
        try:
            FeatureCache(cfg.feature_cache).check(
                tower_identity(vlm.towers, vlm.config.towers, vlm.config.image_mode))
        except FeatureCacheMismatch as e:
            raise ConfigError(f"feature_cache: {e}") from None


def refuse_for_released(cfg: TrainConfig, vlm: ReleasedVLM) -> None:
    """A released wrapper runs transformers' own model: our packing, feature cache and LM speed keys do not
    reach it, so asking for them is a one-line error, not a silent no-op."""
    asked = {"packing": cfg.packing, "feature_cache": cfg.feature_cache, "fused_impl": cfg.fused_impl != "keep",
             "compile_lm": cfg.compile_lm, "eval_data_path": bool(cfg.eval_data_path)}
    for key, on in asked.items():
        if on:
            raise ConfigError(f"{key}: not available for the released family {vlm.family.name} (init_from="
                              f"{cfg.init_from}, run through transformers' model): leave it at its default")


def build_datasets(cfg: TrainConfig, vlm):
    """Train (and eval) datasets; a pre-scan drops bad samples up front and gives exact lengths.

    Variable tokens per image: the VLM's `resolution` (visual/resolution.py; absent or fixed = one count for
    every image) gives each image its count from its size, and `prepare_images` its pixels. Image-token
    budgets: each sample is held to `max_image_tokens` and to `max_batch_image_tokens` divided by the samples
    (or packs) of a micro-batch, so every micro-batch stays within `max_batch_image_tokens` whatever samples
    it draws (packing: the sampler also fills each pack to that share only, see `_prepare`)."""
    if isinstance(vlm, ReleasedVLM):  # the checkpoint's own template and processor (dataset/hf_chat.py)
        frames = cfg.frames_per_video if vlm.video_token is not None else None  # None: video samples refused
        return ReleasedDataset(list(cfg.data_path), vlm.render, cfg.max_length, image_folder=cfg.image_folder,
                               strict=cfg.strict_data, allow_absolute_paths=cfg.allow_absolute_paths,
                               video_folder=cfg.video_folder, frames_per_video=frames), None
    resolution = getattr(vlm, "resolution", None)  # the model side may not have it yet: fixed mode
    common = dict(
        tokenizer=vlm.chat_format,  # the LM's chat template and ids
        image_processor=vlm.image_processor,
        tokens_per_image=vlm.tokens_per_image,
        image_folder=cfg.image_folder,
        video_folder=cfg.video_folder,
        max_length=cfg.max_length,
        mode=cfg.data_mode,
        frames_per_video=cfg.frames_per_video,
        system_prompt=cfg.system_prompt,
        strict=cfg.strict_data,
        allow_absolute_paths=cfg.allow_absolute_paths,
        max_pixels=cfg.max_pixels,
        seed=cfg.seed,
        feature_cache=cfg.feature_cache,
        image_token_id=vlm.image_token_id,  # may differ from the tokenizer's (an imported Llava)
        resolution=resolution,
        prepare_images=prepare_images,
        over_budget=cfg.over_budget,
    )
    paths = list(zip(cfg.data_path, cfg.data_weights)) if cfg.data_weights else list(cfg.data_path)
    train_ds = VLMDataset(paths, **common, max_image_tokens=sample_image_budget(
        cfg.max_image_tokens, cfg.max_batch_image_tokens, cfg.per_device_train_batch_size))
    eval_ds = VLMDataset(list(cfg.eval_data_path), **common, max_image_tokens=sample_image_budget(
        cfg.max_image_tokens, cfg.max_batch_image_tokens, cfg.per_device_eval_batch_size)
    ) if cfg.eval_data_path else None
    if cfg.validate_data:
        for name, ds in (("train", train_ds), ("eval", eval_ds)):
            if ds is not None:
                rep = ds.validate()
                log.info("%s data: %d samples, %d skipped %s", name, len(ds), rep["skipped"], rep["by_kind"])
                if rep["downscaled_samples"]:
                    log.info("%s data: %d sample(s) over the image-token budget downscaled to fit (data_report.json "
                             "lists them)", name, rep["downscaled_samples"])
                if rep["truncated_samples"]:
                    log.warning("%s data: %d sample(s) shortened to max_length=%d: %d turn(s) and %d image(s) "
                                "dropped (data_report.json lists them; raise max_length to keep them)", name,
                                rep["truncated_samples"], cfg.max_length, rep["dropped_turns"],
                                rep["dropped_images"])
    return train_ds, eval_ds


class _SkipForwardingCollator:
    """The dataset's collator, with the batch's skip records carried as a plain key.

    Skips can happen in DataLoader workers; their records ride along with the batch (device placement
    rebuilds the dict, so an attribute would be lost) and the trainer merges them into the dataset.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items):
        batch = self.collator(items)
        out = dict(batch)
        out["skipped_records"] = list(getattr(batch, "skipped", []) or [])
        return out


def training_arguments(cfg: TrainConfig, out: Path, towers_train: bool = False):
    """The Trainer's arguments. `towers_train`: some tower parameters take gradients; a tower read at an
    inner `feature_layer` leaves its later blocks (and e.g. CLIP's post-norm) unused, so DDP must then
    look for unused parameters."""
    if cfg.deepspeed:
        prepare_deepspeed_on_cpu()
    has_eval = bool(cfg.eval_data_path)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.accumulation_steps(world_size()),
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of the run
        lr_scheduler_type=cfg.lr_scheduler_type,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        report_to=cfg.report_to or "none",
        dataloader_num_workers=cfg.dataloader_num_workers,
        remove_unused_columns=False,
        # Evaluation needs only the loss: the VLM computes logits at target positions only (lazy .logits).
        prediction_loss_only=True,
        deepspeed=cfg.deepspeed,
        # `fsdp=true` turns FSDP on (configured by fsdp_config); other strings are transformers' legacy form.
        fsdp=fsdp_flag(cfg.fsdp),
        fsdp_config=cfg.fsdp_config,
        # The LM and projector are always used (see VLM.forward); only a training tower can leave some unused.
        ddp_find_unused_parameters=towers_train,
        ddp_timeout=cfg.ddp_timeout,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        **precision_flags(cfg),
    )


@dataclass
class RunResult:
    output_dir: Path
    model: torch.nn.Module  # the trained VLM, still in memory
    skipped: int  # bad samples skipped during the run (all ranks)
    nan_steps: list[int] = field(default_factory=list)  # optimizer steps skipped for a non-finite loss


def _remove_run_dir(out: Path) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == out.resolve():
            root.removeHandler(h)
            h.close()
    shutil.rmtree(out, ignore_errors=True)


def _prepare(cfg: TrainConfig, out: Path, rank: int, callbacks: Sequence[CallbackFactory] = ()):
    """Everything before the first step: the run directory, the model, the data, the Trainer."""
    if rank == 0:
        writable_dir(out, "output_dir")  # fail before training when the run directory cannot be written
    _setup_logging(out, rank == 0)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        for stale in remove_stale_tmp(out):
            log.warning("removed %s: an unfinished checkpoint of an earlier run", stale)
    set_seed(cfg.seed)
    vlm = build_model(cfg)

    apply_speed_settings(cfg, vlm)
    if rank == 0 and cfg.check_disk_space:
        preflight_disk_space(out, vlm)
    if cfg.stage == "dpo":
        return _prepare_pref(cfg, out, vlm, callbacks)
    train_ds, eval_ds = build_datasets(cfg, vlm)
    args = training_arguments(cfg, out, towers_train=any(p.requires_grad for p in vlm.towers.parameters()))
    resume = resolve_resume(cfg, out)

    sampler_fn = None
    train_input = train_ds
    collator = (released_collate(vlm.pad_token_id, vlm.family.per_sample_inputs) if isinstance(vlm, ReleasedVLM)
                else Collator(pad_id=vlm.pad_token_id))
    # Samplers draw whole optimizer steps (ranks x accumulation); accelerate hands their consecutive
    # micro-batches to the ranks, so any (processes, accumulation) split of the same global batch sees the
    # same samples at each step.
    global_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    if cfg.packing == "samples":
        # Each micro-batch's samples (drawn as without packing) go back to back in one row with cu_seqlens:
        # the same samples per optimizer step as padding, no padding computed.
        collator = PackingCollator()
    if cfg.packing is True:
        # The sampler yields packs (index lists); PackedDataset turns each into its items; the
        # collator puts a micro-batch's packs back to back in one row with cu_seqlens.
        train_input, collator = PackedDataset(train_ds), PackingCollator()

        def sampler_fn(targs):
            budget = cfg.max_batch_image_tokens  # a micro-batch's packs share it (see build_datasets)
            return PackingSampler(train_ds.lengths, max_length=cfg.max_length, batch_size=global_batch,
                                  seed=cfg.seed, image_tokens=train_ds.image_tokens if budget else None,
                                  max_image_tokens=budget // cfg.per_device_train_batch_size if budget else None)
    elif cfg.group_by_length:  # also for packing="samples": similar lengths make rows of similar size
        def sampler_fn(targs):
            return LengthGroupedSampler(train_ds.lengths, batch_size=global_batch, seed=cfg.seed)

    trainer = VLMTrainer(
        model=vlm,
        args=args,
        train_dataset=train_input,
        eval_dataset=eval_ds,
        data_collator=_SkipForwardingCollator(collator),
        callbacks=[AttentionSetup(vlm), ThroughputCallback(vlm), JsonlLogger(out / "log.jsonl")],  # order matters
        lr_settings=dict(learning_rate=cfg.learning_rate, projector_lr=cfg.projector_lr,
                         vision_lr=cfg.vision_lr),
        length_sampler_fn=sampler_fn,
        skip_sink=train_ds.absorb,
        max_consecutive_nan=cfg.max_consecutive_nan,
        inject_nan_steps=cfg.debug_inject_nan_steps,
    )
    for make in callbacks:  # e.g. benchmarks every eval_steps, logged like the loss (train.py passes them)
        for callback in make(cfg, trainer, out):
            trainer.add_callback(callback)
    return vlm, train_ds, trainer, resume


def _prepare_pref(cfg: TrainConfig, out: Path, vlm, callbacks: Sequence[CallbackFactory] = ()):
    """Stage dpo: preference pairs, [chosen; rejected] batches and the PrefTrainer (trainer/pref_trainer.py)."""
    if world_size() > 1:
        raise ConfigError("stage=dpo runs in one process for now (the pair forward bypasses the DDP wrapper): "
                          "launch without torchrun")
    if isinstance(vlm, ReleasedVLM):
        raise ConfigError(f"stage=dpo: not available for the released family {vlm.family.name} yet")
    if vlm.resolution.mode != "fixed":
        raise ConfigError(f"stage=dpo: models with a variable resolution ({vlm.resolution.mode}) are not supported "
                          f"yet; use a fixed-resolution model")
    train_ds, eval_ds = build_pref_datasets(cfg, vlm)
    args = training_arguments(cfg, out, towers_train=any(p.requires_grad for p in vlm.towers.parameters()))
    global_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    trainer = PrefTrainer(
        model=vlm, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=PairBatches(vlm.pad_token_id),
        callbacks=[AttentionSetup(vlm), JsonlLogger(out / "log.jsonl")],
        lr_settings=dict(learning_rate=cfg.learning_rate, projector_lr=cfg.projector_lr, vision_lr=cfg.vision_lr),
        length_sampler_fn=(lambda targs: LengthGroupedSampler(train_ds.lengths, batch_size=global_batch,
                                                              seed=cfg.seed)) if cfg.group_by_length else None,
        skip_sink=train_ds.absorb, max_consecutive_nan=cfg.max_consecutive_nan,
        inject_nan_steps=cfg.debug_inject_nan_steps,
        pref_loss=cfg.pref_loss, pref_settings=dataclasses.asdict(cfg), precompute_ref_logps=cfg.precompute_ref_logps,
    )
    for make in callbacks:
        for callback in make(cfg, trainer, out):
            trainer.add_callback(callback)
    return vlm, train_ds, trainer, resolve_resume(cfg, out)


def train(cfg: TrainConfig, callbacks: Sequence[CallbackFactory] = ()) -> RunResult:
    check_paths(cfg)  # for library callers; train.py checks before importing this module (a few stat calls)
    if cfg.eval_tasks and not callbacks:
        raise ConfigError("eval_tasks needs the evaluation's callbacks: train(cfg, callbacks=[eval_task_callbacks]) "
                          "with eval_task_callbacks from qwenvl_lab.evaluation.during_training (train.py passes it)")
    out = Path(cfg.output_dir)
    rank = int(os.environ.get("RANK", "0"))
    # A run that fails before its first step leaves no half-made run directory behind.
    fresh = rank == 0 and not (out.is_dir() and any(out.iterdir()))
    try:
        vlm, train_ds, trainer, resume = _prepare(cfg, out, rank, callbacks)
    except BaseException:
        if fresh:
            _remove_run_dir(out)
        raise
    trainer.train(resume_from_checkpoint=resume)
    # Each rank met its own bad samples: rank 0 reports them all.
    for records in gather_objects(list(train_ds.skipped.values())):
        train_ds.absorb(records)
    report = train_ds.skip_report()
    report["samples"] = sorted(train_ds.skipped.values(), key=lambda r: (r["file"], r["position"]))
    report["nan_steps_skipped"] = len(trainer.nan_steps)
    report["nan_steps"] = list(trainer.nan_steps)
    if trainer.nan_steps:
        log.warning("skipped %d optimizer step(s) with a non-finite loss: %s", len(trainer.nan_steps),
                    trainer.nan_steps)

    if trainer.nan_abort:
        if trainer.args.should_save:
            (out / "data_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        raise TrainingAborted(
            f"stopped at step {trainer.state.global_step}: {trainer.nan_in_a_row} optimizer steps in a row had "
            f"a non-finite loss or gradient (max_consecutive_nan={cfg.max_consecutive_nan}); their updates were "
            f"skipped, so {latest_checkpoint(out)} holds the last good weights. Lower the learning rate or check "
            f"the data, then resume with resume_from_checkpoint=auto"
        )

    gathered = trainer.gathered_state_dict()  # FSDP / ZeRO-3: every rank takes part in gathering the shards
    if trainer.args.should_save:
        final = out / "final"
        staging = make_tmp_dir(out, "final")  # renamed once complete
        trainer.write_vlm(staging, trainable_only=not cfg.save_full_model, state_dict=gathered)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        (out / "data_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        if report.get("skipped"):
            log.warning("skipped %d bad samples: %s", report["skipped"], report["by_kind"])
        png = plot_loss(out / "log.jsonl", out / "loss.png")
        log.info("run finished: %s (loss curve: %s)", final, png)
    return RunResult(out, vlm, report["skipped"], list(trainer.nan_steps))


def close_process_group(wait_for_others: bool) -> None:
    """Under torchrun, leave the process group cleanly: a group torn down by interpreter exit can abort
    a rank ("terminate called without an active exception") after a successful run (train.py calls it)."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
