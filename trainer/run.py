"""One training run, start to finish: `train(cfg) -> run directory`.

The run directory (`output_dir`) holds
  config.yaml           the resolved TrainConfig
  checkpoint-N/         trainable weights (safetensors) + optimizer/scheduler/RNG state (safetensors+JSON)
  final/                the trained model, loadable with `VLM.from_pretrained(output_dir/final)`
  log.jsonl, runs/      the Trainer's log lines (JSONL, TensorBoard)
  loss.png              the loss curve
  data_report.json      skipped samples with their reasons
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.config_io import save_config

log = logging.getLogger("trainer")


def _setup_logging(out: Path, rank0: bool) -> None:
    level = logging.INFO if rank0 else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank0:
        handlers.append(logging.FileHandler(out / "train.log", encoding="utf-8"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def preflight_output_dir(out: Path) -> None:
    """Fail before training when the run directory cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RuntimeError(f"output_dir {out} is not writable: {e}") from None


def resolve_resume(cfg: TrainConfig, out: Path) -> str | None:
    """`auto` -> the newest complete checkpoint in the run directory (or None); a path is checked."""
    value = cfg.resume_from_checkpoint
    if value in (None, "", "none", "false"):
        return None
    if value == "auto":
        from trainer.checkpoints import latest_checkpoint

        found = latest_checkpoint(out)
        log.info("resume_from_checkpoint=auto -> %s", found or "no checkpoint, starting fresh")
        return str(found) if found else None
    if not Path(value).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} is not a directory")
    return value


def precision_flags(cfg: TrainConfig) -> dict:
    p = cfg.precision
    if p == "auto":
        p = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if p in ("bf16", "fp16") and not torch.cuda.is_available():
        raise RuntimeError(f"precision={p} needs a GPU here; use precision=fp32 (or auto) on a CPU")
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def build_model(cfg: TrainConfig):
    """The VLM for this run, with the stage's trainable set applied (and LoRA when asked)."""
    from model import VLM, build_vlm
    from trainer.stages import apply_lora, set_trainable

    if cfg.init_from:
        vlm = VLM.from_pretrained(cfg.init_from)
        if cfg.model or cfg.preset:
            log.warning("init_from=%s: the model/preset keys are ignored", cfg.init_from)
    else:
        vlm = build_vlm(cfg.vlm_config())
    if cfg.stage == "sft" and cfg.lora.r > 0:
        # Starting from a LoRA run: fold its adapters in, then add fresh ones for this stage.
        vlm.merge_lora()
        apply_lora(vlm, cfg.lora)
    set_trainable(vlm, cfg.stage, cfg.vision_lr, cfg.freeze, cfg.unfreeze)
    if cfg.gradient_checkpointing:
        vlm.gradient_checkpointing_enable()
    return vlm


def build_datasets(cfg: TrainConfig, vlm):
    """Train (and eval) datasets; a pre-scan drops bad samples up front and gives exact lengths."""
    from dataset import VLMDataset

    common = dict(
        tokenizer=vlm.tokenizer,
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
        seed=cfg.seed,
    )
    paths = list(zip(cfg.data_path, cfg.data_weights)) if cfg.data_weights else list(cfg.data_path)
    train_ds = VLMDataset(paths, **common)
    eval_ds = VLMDataset(list(cfg.eval_data_path), **common) if cfg.eval_data_path else None
    if cfg.validate_data:
        for name, ds in (("train", train_ds), ("eval", eval_ds)):
            if ds is not None:
                rep = ds.validate()
                log.info("%s data: %d samples, %d skipped %s", name, len(ds), rep["skipped"], rep["by_kind"])
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


def training_arguments(cfg: TrainConfig, out: Path):
    from transformers import TrainingArguments

    has_eval = bool(cfg.eval_data_path)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
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
        deepspeed=cfg.deepspeed,
        fsdp=cfg.fsdp,
        fsdp_config=cfg.fsdp_config,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        **precision_flags(cfg),
    )


@dataclass
class RunResult:
    output_dir: Path
    model: torch.nn.Module  # the trained VLM, still in memory
    skipped: int  # bad samples skipped during the run


def train(cfg: TrainConfig) -> RunResult:
    out = Path(cfg.output_dir)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        preflight_output_dir(out)
    _setup_logging(out, rank == 0)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    from transformers import set_seed

    from dataset import Collator
    from trainer.callbacks import JsonlLogger, plot_loss
    from trainer.hf_trainer import VLMTrainer

    set_seed(cfg.seed)
    vlm = build_model(cfg)
    train_ds, eval_ds = build_datasets(cfg, vlm)
    args = training_arguments(cfg, out)
    resume = resolve_resume(cfg, out)

    sampler_fn = None
    if cfg.group_by_length:
        from dataset import LengthGroupedSampler

        def sampler_fn(targs):
            # One sampler for the global batch; accelerate hands its consecutive micro-batches to the ranks.
            return LengthGroupedSampler(
                train_ds.lengths, batch_size=targs.per_device_train_batch_size * targs.world_size,
                seed=cfg.seed,
            )

    trainer = VLMTrainer(
        model=vlm,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=_SkipForwardingCollator(Collator(pad_id=vlm.tokenizer.eod_id)),
        callbacks=[JsonlLogger(out / "log.jsonl")],
        lr_settings=dict(learning_rate=cfg.learning_rate, projector_lr=cfg.projector_lr,
                         vision_lr=cfg.vision_lr),
        length_sampler_fn=sampler_fn,
        skip_sink=train_ds.absorb,
    )
    trainer.train(resume_from_checkpoint=resume)
    report = train_ds.skip_report()

    if trainer.args.should_save:
        final = out / "final"
        if final.exists():
            shutil.rmtree(final)
        vlm.save_pretrained(final, trainable_only=not cfg.save_full_model)
        (out / "data_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        if report.get("skipped"):
            log.warning("skipped %d bad samples: %s", report["skipped"], report["by_kind"])
        png = plot_loss(out / "log.jsonl", out / "loss.png")
        log.info("run finished: %s (loss curve: %s)", final, png)
    return RunResult(out, vlm, report["skipped"])
