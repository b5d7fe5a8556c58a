"""The Hugging Face Trainer, adapted to the VLM.

What changes from the stock Trainer (DDP / FSDP / DeepSpeed, the loop, logging all stay its own):
* optimizer: AdamW over `trainer.optim.param_groups` (one LR per part, no decay on biases and norms);
* loss: token-normalised over the whole gradient-accumulation window: each micro-batch contributes
  `sum of its token losses / target tokens in the window`, so micro-batch size and accumulation do not
  change the loss (the LM returns a per-token mean; we rescale it by its own token count);
* checkpoints: trainable weights through `VLM.save_pretrained(trainable_only=True)`; optimizer,
  scheduler and RNG states as safetensors + JSON (`trainer.state_io`), never pickle;
* sampler: the dataset's own length-grouped sampler, so lengths come from the cheap estimate instead of
  loading every sample once;
* atomic checkpoints: everything goes into `checkpoint-N.tmp-XXXX`, which rank 0 renames to
  `checkpoint-N` once complete (then rotates old ones); a process killed mid-save leaves only a `.tmp-`
  directory, which resuming ignores. Only rank 0 writes: the other ranks' RNG states are gathered to it;
* non-finite steps: when the loss or the gradient norm of an optimizer step is NaN/inf on any rank, the
  gradients are dropped (`p.grad = None`, so AdamW leaves weights and moments untouched), buffers
  (batch-norm statistics) are put back to their values at the step's start, the step is
  counted (`nan_steps_skipped`, in the log lines) and logged; `max_consecutive_nan` such steps in a row
  save a checkpoint and stop the run (`nan_abort` is then set; `trainer.run` raises; the `NonFiniteStop`
  callback asks the Trainer for the save and the stop). The learning-rate schedule still advances. Not
  applied under DeepSpeed, whose engine owns the optimizer step.

The private Trainer methods this module still overrides or calls, and why no public hook serves for each,
are listed in docs/architecture.md.

Test hooks (no effect unless set): `inject_nan_steps` (config `debug_inject_nan_steps`) multiplies the
loss of those optimizer steps (1-based) by NaN; the environment variable `QWENVL_DEBUG_SAVE_PAUSE=STEP:SECONDS`
sleeps inside the save of checkpoint STEP, after its weights are written, so a test can kill the process
mid-save.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import rotate_checkpoints

from ..core.loss import count_targets
from ..model.checkpoint import load_trainable_weights, read_weights
from . import state_io
from .checkpoints import make_tmp_dir
from .engines import enable_fsdp_on_cpu, retie
from .optim import describe_groups, param_groups

log = logging.getLogger(__name__)

# Private parts of transformers' Trainer this module relies on: the methods it overrides (each calls or
# replaces the stock one with the same signature), the private methods it calls (and `save_model`, called
# with its private `_internal_call`) and the attributes it sets. They are not a public API, so
# tests/test_trainer_private_api.py checks each against the installed transformers and against the
# signatures of the declared range; pyproject.toml's transformers range is the range that test ran on.
# docs/architecture.md says, for each, why no public hook (a callback, compute_loss, create_optimizer ...)
# serves instead.
PRIVATE_TRAINER_METHODS = (
    "_get_grad_norm", "_get_train_sampler", "_save", "_load_from_checkpoint", "_load_optimizer_and_scheduler",
    "_save_checkpoint", "_load_rng_state",
)
PRIVATE_TRAINER_CALLS = ("_get_output_dir", "_save_scaler", "_push_from_checkpoint", "_prepare_inputs", "save_model")
PRIVATE_TRAINER_ATTRIBUTES = ("model_accepts_loss_kwargs", "_loss_shifts_labels")

OPTIMIZER_STATE = "optimizer_state"
SCHEDULER_STATE = "scheduler_state"
TRAINER_STATE = "trainer_state.json"
SAVE_PAUSE_ENV = "QWENVL_DEBUG_SAVE_PAUSE"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (just `[obj]` in a single process)."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _debug_pause_in_save(step: int) -> None:
    spec = os.environ.get(SAVE_PAUSE_ENV)
    if not spec:
        return
    at, seconds = spec.split(":")
    if int(at) == step:
        log.warning("%s: pausing %s s inside the save of checkpoint-%d", SAVE_PAUSE_ENV, seconds, step)
        time.sleep(float(seconds))


def unwrap(model):
    """The VLM under DDP/FSDP/DeepSpeed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


class NonFiniteStop(TrainerCallback):
    """Once `trainer.nan_abort` is set (`max_consecutive_nan` non-finite steps in a row): save a checkpoint
    (the skipped steps left the weights intact), log the step and stop training, once per step.

    The Trainer acts on these flags in `_maybe_log_save_evaluate`, which it calls right after the
    `on_step_end` and `on_epoch_end` events, and `nan_abort` is set before the optimizer step, so the flags
    are set in those two events. `VLMTrainer.train` moves this callback to the end of the list, after the
    callbacks added since `__init__` too: another callback's `on_step_end` may call `trainer.log`, which
    clears `should_log` (`EvalTasksCallback` does), so the flags must be set after every other callback ran."""

    def __init__(self, trainer: VLMTrainer):
        self.trainer = trainer
        self.saved_at = -1  # the step whose save and stop were asked for

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.nan_abort and self.saved_at != state.global_step:
            self.saved_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            control.should_log = True
        return control

    on_epoch_end = on_step_end


class VLMTrainer(Trainer):
    def __init__(self, *args, lr_settings: dict, length_sampler_fn=None, skip_sink=None,
                 max_consecutive_nan: int = 5, inject_nan_steps=(), **kwargs):
        self.lr_settings = lr_settings
        self.length_sampler_fn = length_sampler_fn
        self.skip_sink = skip_sink  # receives the skip records of bad samples met in DataLoader workers
        self.max_consecutive_nan = max_consecutive_nan
        self.inject_nan_steps = {int(s) for s in inject_nan_steps}
        self.nan_steps: list[int] = []  # optimizer steps (1-based) whose update was skipped
        self.nan_in_a_row = 0
        self.nan_abort = False
        self._loss_logged_at = 0
        self._window_nonfinite = False  # a non-finite micro-batch loss since the last optimizer step
        self._buffers_before_step: dict | None = None  # batch-norm statistics etc. at the step's start
        super().__init__(*args, **kwargs)
        # We normalise by target tokens ourselves (compute_loss), so the Trainer must count them over
        # the accumulation window (shifted, as the LM's loss is) and must not divide by the step count.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.nonfinite_stop = NonFiniteStop(self)
        self.add_callback(self.nonfinite_stop)

    def train(self, *args, **kwargs):
        # NonFiniteStop must run after every other callback, the ones added since __init__ included.
        self.pop_callback(self.nonfinite_stop)
        self.add_callback(self.nonfinite_stop)
        return super().train(*args, **kwargs)

    # ---- FSDP on a CPU ----------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            self.is_fsdp_enabled = enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)

    # ---- optimizer -------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = param_groups(unwrap(opt_model), weight_decay=self.args.weight_decay, **self.lr_settings)
            log.info("optimizer groups:\n%s", describe_groups(groups))  # once: param_groups does not log
            # The fused kernel updates every tensor of a group in one pass (CPU and CUDA); it needs
            # floating-point parameters on one of those devices.
            params = [p for g in groups for p in g["params"]]
            fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
            self.optimizer = torch.optim.AdamW(
                groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, fused=fused,
            )
        return self.optimizer

    # ---- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped_records", None)
        if skipped and self.skip_sink is not None:
            self.skip_sink(skipped)
        if self.model.training and self._buffers_before_step is None:
            # The forward of a step that turns out non-finite still moves batch-norm running statistics
            # (possibly to NaN); keep the step's starting buffers (small) to put them back.
            self._buffers_before_step = {n: b.detach().clone() for n, b in unwrap(model).named_buffers()}
        outputs = model(**inputs)
        loss = outputs.loss
        if self.model.training and self.state.global_step + 1 in self.inject_nan_steps:
            loss = loss * float("nan")  # test hook: a poisoned step
        if self.model.training and not torch.isfinite(loss.detach()).all():
            self._window_nonfinite = True
        if num_items_in_batch is not None:
            # mean over this micro-batch's targets -> its share of the window's token mean
            n_here = count_targets(inputs["labels"], inputs.get("cu_seqlens"))
            loss = loss * n_here.to(loss.dtype) / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP averages gradients over ranks, and num_items_in_batch already counts all ranks.
                loss = loss * self.args.world_size
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the token-mean loss only (training-time evaluation never needs logits)."""
        inputs = dict(inputs)
        inputs.pop("skipped_records", None)  # eval-set skips are not part of the training report
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = model(**inputs).loss
        return loss.detach(), None, None

    # ---- non-finite steps -------------------------------------------------------------------------
    def _get_grad_norm(self, model, grad_norm=None):
        # Called once per optimizer step, after backward (and clipping) and right before optimizer.step().
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if not self.is_deepspeed_enabled:
            self._guard_nonfinite_step(model, grad_norm)
        return grad_norm

    def _guard_nonfinite_step(self, model, grad_norm) -> None:
        bad = self._window_nonfinite or (grad_norm is not None and not math.isfinite(float(grad_norm)))
        self._window_nonfinite = False
        buffers, self._buffers_before_step = self._buffers_before_step, None
        if _distributed():
            # Every rank must take the same decision, or their weights drift apart.
            flag = torch.tensor([float(bad)], device=self.args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item() > 0)
        if not bad:
            self.nan_in_a_row = 0
            return
        for p in model.parameters():
            p.grad = None  # AdamW skips parameters without a gradient: no update, moments untouched
        with torch.no_grad():
            for name, b in unwrap(model).named_buffers():
                if buffers is not None and name in buffers:
                    b.copy_(buffers[name])
        step = self.state.global_step + 1
        self.nan_steps.append(step)
        self.nan_in_a_row += 1
        log.warning("step %d: non-finite loss or gradients (grad norm %s); update skipped (%d skipped so "
                    "far, %d in a row, limit max_consecutive_nan=%d)", step, grad_norm, len(self.nan_steps),
                    self.nan_in_a_row, self.max_consecutive_nan)
        if self.nan_in_a_row >= self.max_consecutive_nan:
            self.nan_abort = True

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self.nan_steps and "loss" in logs:
            logs["nan_steps_skipped"] = len(self.nan_steps)
            covered = range(self._loss_logged_at + 1, self.state.global_step + 1)
            if covered and all(s in self.nan_steps for s in covered):
                # The Trainer's NaN filter would log a made-up value (0 right after a log); say it.
                logs["loss"] = float("nan")
        if "loss" in logs:
            self._loss_logged_at = self.state.global_step
        super().log(logs, *args, **kwargs)

    # ---- sampler ---------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if self.length_sampler_fn is not None:
            return self.length_sampler_fn(self.args)
        return super()._get_train_sampler(train_dataset)

    # ---- checkpoints -----------------------------------------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        self.write_vlm(output_dir or self.args.output_dir, trainable_only=True, state_dict=state_dict)

    def write_vlm(self, output_dir, trainable_only: bool, state_dict: dict | None = None) -> None:
        """Rank 0 writes the VLM; `state_dict`: the gathered full tensors under FSDP / ZeRO-3 (the
        module's own are shards then), see `gathered_state_dict`."""
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        vlm = unwrap(self.model)
        if state_dict is None:
            vlm.save_pretrained(output_dir, trainable_only=trainable_only)
            return
        state_dict = retie(vlm, dict(state_dict))
        vlm.state_dict = lambda *a, **k: state_dict
        try:
            vlm.save_pretrained(output_dir, trainable_only=trainable_only)
        finally:
            del vlm.state_dict  # back to nn.Module.state_dict

    def gathered_state_dict(self) -> dict | None:
        """Every rank must call this: under FSDP or ZeRO-3 the full tensors gathered from the shards (on
        rank 0; the others may get an empty dict); None where each rank holds whole weights."""
        if self.is_fsdp_enabled:
            return self.accelerator.get_state_dict(self.model)
        if self.is_deepspeed_enabled and self.accelerator.deepspeed_config["zero_optimization"]["stage"] == 3:
            return self.accelerator.get_state_dict(self.model_wrapped)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_fsdp_enabled:
            # Parameters are shards (DTensors): every rank reads the full tensors and keeps its shard.
            tensors = read_weights(resume_from_checkpoint)
            set_model_state_dict(model or self.model, tensors,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
            return
        load_trainable_weights(unwrap(model or self.model), resume_from_checkpoint)

    def _inner_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper -> torch's

    def _write_optimizer_and_scheduler(self, output_dir):
        if self.is_deepspeed_enabled:
            # The engine writes its own partitioned optimizer files (DeepSpeed's format, one per rank).
            self.model_wrapped.save_checkpoint(output_dir)
            optim_state = None
        elif self.is_fsdp_enabled:
            # One full optimizer state keyed by parameter name (collective; rank 0 gets the tensors), so a
            # resume may use another number of processes.
            optim_state = get_optimizer_state_dict(self.model, self._inner_optimizer(),
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim_state = self.optimizer.state_dict()
        if self.args.should_save:
            if optim_state is not None:
                state_io.save_state(optim_state, output_dir, OPTIMIZER_STATE)
            state_io.save_state(self.lr_scheduler.state_dict(), output_dir, SCHEDULER_STATE)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        if not state_io.has_state(checkpoint, SCHEDULER_STATE):
            return super()._load_optimizer_and_scheduler(checkpoint)  # a checkpoint in the Trainer's format
        if self.is_fsdp_enabled:
            set_optimizer_state_dict(self.model, self._inner_optimizer(), state_io.load_state(checkpoint, OPTIMIZER_STATE),
                                     options=StateDictOptions(full_state_dict=True))
        elif not self.is_deepspeed_enabled:  # DeepSpeed's engine has loaded its own files already
            self.optimizer.load_state_dict(state_io.load_state(checkpoint, OPTIMIZER_STATE))
        self.lr_scheduler.load_state_dict(state_io.load_state(checkpoint, SCHEDULER_STATE))

    def _write_rng_state(self, output_dir):
        # Every rank's state, written by rank 0 alone (one writer per run directory).
        states = gather_objects(state_io.rng_state())
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            for rank, state in enumerate(states):
                state_io.save_state(state, output_dir, f"rng_state_{rank}")

    def _shared_tmp_dir(self, run_dir: Path, name: str) -> Path:
        """A fresh `name.tmp-XXXX` made by rank 0; every rank gets its path (they may write into it)."""
        path = [None]
        if self.args.should_save:
            run_dir.mkdir(parents=True, exist_ok=True)
            path[0] = str(make_tmp_dir(run_dir, name))
        if _distributed():
            dist.broadcast_object_list(path, src=0)
        return Path(path[0])

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, written into a temporary directory and renamed when complete. The
        optimizer, scheduler and RNG states are written by our own `_write_*` methods (the Trainer's
        `_save_optimizer_and_scheduler` and `_save_rng_state` are called from its `_save_checkpoint` alone,
        which this replaces)."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        final = run_dir / f"checkpoint-{step}"
        tmp = self._shared_tmp_dir(run_dir, final.name)
        self.save_model(str(tmp), _internal_call=True)
        if not self.args.save_only_model:
            self._write_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._write_rng_state(str(tmp))
        if self.state.best_global_step:
            best = run_dir / f"checkpoint-{self.state.best_global_step}"
            if self.state.best_global_step == step or best.exists():
                self.state.best_model_checkpoint = str(best)
        if self.args.should_save:
            _debug_pause_in_save(step)
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks[name], list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(str(tmp / TRAINER_STATE))  # last file: marks the checkpoint complete
        self.accelerator.wait_for_everyone()  # other ranks may still write (DeepSpeed shards)
        if self.args.should_save:
            _sync_tree(tmp)
            if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
                old = make_tmp_dir(run_dir, final.name)
                os.replace(final, old / "old")
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
            _sync_dir(run_dir)
            if self.args.push_to_hub:
                self._push_from_checkpoint(str(final))
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _load_rng_state(self, checkpoint):
        if checkpoint is None:
            return
        name = f"rng_state_{self.args.process_index}"
        if not state_io.has_state(checkpoint, name):
            log.warning("no RNG state %s in %s: resumed data order and dropout may differ", name, checkpoint)
            return
        state_io.set_rng_state(state_io.load_state(checkpoint, name))


def _sync_dir(path: Path) -> None:
    """fsync a directory entry (a rename is durable only once its directory is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _sync_tree(path: Path) -> None:
    """fsync every file under `path`, so a power loss after the rename cannot leave empty files."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    _sync_dir(path)
