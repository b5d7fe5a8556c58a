"""Throughput and model FLOPs utilisation (MFU) logged during training: `ThroughputCallback(model)`.

The FLOPs of each micro-batch are counted by `model/flops.py` (`step_flops`); MFU = counted FLOPs per
second of wall time / `model.flops.peak_matmul_flops(device, dtype)` (measured once per process on this
device and dtype), so MFU is relative to what this machine actually reaches, not a data-sheet number.

`ThroughputCallback(model, peak_flops=None)` (a transformers `TrainerCallback`): a forward pre-hook on
`model` counts each training micro-batch (samples, tokens, targets, images, FLOPs; `.totals` holds the
run's sums; images with cached features count as images); at every logging step
it adds to the log line: `tokens_per_s`, `target_tokens_per_s`, `samples_per_s`, `images_per_s`,
`tflops` (achieved TFLOP/s), `mfu`, `data_wait_frac` (time between the end of one optimizer step and the
start of the next, which is where the Trainer fetches the next batches, over the window's wall time) and
`peak_mem_gb` (CUDA: max_memory_allocated since the last log; CPU: the process's peak RSS). Figures are
per process (per device). Time spent in evaluation and checkpoint saving is left out of the window.
When the model's dimensions cannot be read (an unusual LM or tower layout), `tflops` and `mfu` are left
out with one warning and the other figures are still logged. ZeRO-3 partitioned weights are counted at
their full size (`ds_numel` / `ds_shape`).
Place it before `JsonlLogger` in `callbacks=[...]` so the log file sees the fields (callbacks run in
list order; the progress printer runs after all of them).
"""

from __future__ import annotations

import logging
import resource
import time

import torch
from torch import nn
from transformers import TrainerCallback

from ..model.flops import ModelDims, batch_stats, peak_matmul_flops, step_flops

log = logging.getLogger(__name__)


# ----- the callback -----------------------------------------------------------------------------------
class ThroughputCallback(TrainerCallback):
    def __init__(self, model: nn.Module, peak_flops: float | None = None):
        self.model = model
        self.peak_flops = peak_flops
        self.dims: ModelDims | bool | None = None  # None: not read yet; False: unreadable
        self.totals = {"samples": 0, "tokens": 0, "targets": 0, "images": 0, "flops": 0}  # whole run
        self._reset_window(time.perf_counter())
        self._last_event = time.perf_counter()
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _reset_window(self, now: float) -> None:
        self.window = {"samples": 0, "tokens": 0, "targets": 0, "images": 0, "flops": 0}
        self._window_start, self._wait, self._other = now, 0.0, 0.0

    def _count(self, module, args, kwargs):
        if not module.training or not torch.is_grad_enabled():
            return None  # evaluation and generation are not training throughput
        batch = dict(kwargs)
        if args:
            batch.setdefault("input_ids", args[0])
        if batch.get("input_ids") is None:
            return None
        if self.dims is None:
            self.dims = self._dims(module)
        stats = batch_stats(batch)
        flops = step_flops(self.dims, stats)["total"] if self.dims is not False else 0
        seen = {"samples": stats.samples, "tokens": stats.tokens, "targets": stats.targets,
                "images": stats.image_count, "flops": flops}
        for acc in (self.window, self.totals):
            for k, v in seen.items():
                acc[k] += v
        return None

    @staticmethod
    def _dims(model: nn.Module) -> ModelDims | bool:
        """The model's FLOP dimensions, or False (FLOPs and MFU not logged) when they cannot be read."""
        try:
            return ModelDims.from_model(model)
        except (AttributeError, TypeError, ValueError) as e:  # an unusual LM / tower / sharded layout
            log.warning("ThroughputCallback: no FLOP count for this model (%s); logging throughput only", e)
            return False

    # -- Trainer events ----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.dims = self._dims(self.model)  # the trainable set is final now
        if self.peak_flops is None:
            device = next(self.model.parameters()).device
            dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
            self.peak_flops = peak_matmul_flops(device, dtype)
            log.info("peak matmul throughput on %s (%s): %.2f TFLOP/s", device, dtype, self.peak_flops / 1e12)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        now = time.perf_counter()
        self._reset_window(now)
        self._last_event = now

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._wait += now - self._last_event  # the Trainer fetched this step's batches in between
        self._last_event = now

    def on_step_end(self, args, state, control, **kwargs):
        self._last_event = time.perf_counter()

    def _exclude(self) -> None:
        now = time.perf_counter()
        self._other += now - self._last_event
        self._last_event = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._exclude()

    def on_save(self, args, state, control, **kwargs):
        self._exclude()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self.window["samples"]:
            return
        now = time.perf_counter()
        elapsed = max(now - self._window_start - self._other, 1e-9)
        w = self.window
        metrics = {
            "tokens_per_s": w["tokens"] / elapsed,
            "target_tokens_per_s": w["targets"] / elapsed,
            "samples_per_s": w["samples"] / elapsed,
            "images_per_s": w["images"] / elapsed,
            "data_wait_frac": min(self._wait / elapsed, 1.0),
            "peak_mem_gb": peak_memory_gb(),
        }
        if self.dims:
            metrics["tflops"] = w["flops"] / elapsed / 1e12
            metrics["mfu"] = w["flops"] / elapsed / self.peak_flops if self.peak_flops else 0.0
        metrics = {k: float(f"{v:.4g}") for k, v in metrics.items()}  # 4 significant digits
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)  # the Trainer stored a copy before calling us
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._reset_window(now)
        self._last_event = now

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()


def peak_memory_gb() -> float:
    """CUDA: max_memory_allocated since the last reset; CPU: this process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
