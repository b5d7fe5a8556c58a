"""Trainer callbacks: the attention implementation resolved before the first step (`AttentionSetup`);
every Trainer log line to `log.jsonl` (rank 0 only) and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


class AttentionSetup(TrainerCallback):
    """`on_train_begin` runs after the Trainer has put the model on its device (and wrapped it) and before
    the first forward: the one place to resolve the attention implementation (`VLM.prepare_attention`,
    the GPU self-test for `auto`) for the weights' dtype and the autocast dtype of the run. Inside the
    first forward it would run under gradient checkpointing or a compiled graph (its own backward
    breaks both)."""

    def __init__(self, vlm):
        self.vlm = vlm

    def on_train_begin(self, args, state, control, **kwargs):
        dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
        chosen = self.vlm.prepare_attention(dtype)
        if chosen:
            log.info("attention before the first step: %s", chosen)


class JsonlLogger(TrainerCallback):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.t0 = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time() - self.t0, 3), **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


def plot_loss(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Training (and eval) loss against step; returns the PNG path, or None when nothing was logged. A
    preference run (stage dpo) adds a second panel: reward accuracy and margin, train and eval."""
    rows = read_log(log_path)
    train = _series(rows, "loss")
    evals = _series(rows, "eval_loss")
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rewards = [(name, _series(rows, name)) for name in ("rewards/accuracies", "rewards/margins",
                                                        "eval_rewards/accuracies", "eval_rewards/margins")]
    rewards = [(name, pts) for name, pts in rewards if pts]
    if rewards:
        fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        for name, pts in rewards:
            ax_r.plot(*zip(*pts), "o-" if name.startswith("eval_") else "-", label=name)
        ax_r.set_xlabel("step")
        ax_r.grid(alpha=0.3)
        ax_r.legend()
    else:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
