"""Stage `dpo`: the Trainer on preference pairs (DPO / IPO / SimPO / ORPO, trainer/pref_loss.py).

`PrefTrainer(VLMTrainer)` takes the batches of dataset/pref_data.py `PairCollator` ([chosen...; rejected...],
each pair's images once) and, per micro-batch:
  towers once on the pairs' images -> policy log-probs of the 2B rows (model/preference.py `pair_logps`) ->
  for sigmoid / ipo the reference log-probs from the same model (`Reference`: LoRA adapters off + the snapshot
  of the other trainable tensors taken when the Trainer is built, before the first step) -> `preference_loss`.
The loss is the mean over the micro-batch's pairs; the Trainer divides it by the accumulation steps.
Logged (train and, prefixed `eval_`, held-out evaluation on `eval_data_path` every `eval_steps`), under trl's
names, means since the last log line: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
`rewards/margins`, `logps/chosen`, `logps/rejected`; they reach log.jsonl and TensorBoard like the loss.
Checkpoints carry the reference snapshot (`reference.safetensors`); a resume loads it, so the reference of a
resumed run is the one the run started with. Single process only (trainer/run.py refuses more): the pair
forward does not go through a DDP / FSDP wrapper's forward.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import UserError
from ..dataset.pref_data import PrefDataset
from ..model.preference import Reference, pair_features, pair_logps, reference_logps
from .hf_trainer import VLMTrainer, unwrap
from .pref_loss import REFERENCE_FREE, PrefLoss, preference_loss, reward_metrics

REFERENCE_FILE = "reference.safetensors"
LOSS_KEYS = ("beta", "label_smoothing", "rpo_alpha", "simpo_gamma")
log = logging.getLogger("qwenvl_lab.trainer")


class PrefTrainer(VLMTrainer):
    def __init__(self, *args, pref_loss: str, pref_settings: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.pref_loss, self.pref_settings = pref_loss, {k: pref_settings[k] for k in LOSS_KEYS}
        # A mean over pairs, not over target tokens: the Trainer divides each micro-batch by the accumulation.
        self.model_accepts_loss_kwargs = False
        self.reference = None if pref_loss in REFERENCE_FREE else Reference(unwrap(self.model))
        self._pref_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def pref_forward(self, inputs: dict) -> PrefLoss:
        vlm = unwrap(self.model)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]  # [2B, T]
        counts, pixels = inputs["image_counts"], inputs.get("pixel_values")  # [B], [n_images, 3, H, W]
        feats = pair_features(vlm, pixels)  # the towers once for the pairs' images
        logps, n_targets = pair_logps(vlm, ids, mask, labels, counts, feats)  # [2B], [2B]
        B = logps.shape[0] // 2
        ref = None
        if self.reference is not None:
            ref = reference_logps(vlm, self.reference, ids, mask, labels, counts, feats, pixels)  # [2B]
        return preference_loss(self.pref_loss, logps[:B], logps[B:], n_targets[:B], n_targets[B:],
                               None if ref is None else ref[:B], None if ref is None else ref[B:],
                               **self.pref_settings)

    def _record(self, mode: str, out: PrefLoss) -> None:
        for k, v in reward_metrics(out).items():
            self._pref_metrics[mode][k].append(v)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped_records", None)
        if skipped and self.skip_sink is not None:
            self.skip_sink(skipped)
        training = self.model.training
        if training and self._buffers_before_step is None:  # see VLMTrainer.compute_loss
            self._buffers_before_step = {n: b.detach().clone() for n, b in unwrap(model).named_buffers()}
        out = self.pref_forward(inputs)
        self._record("train" if training else "eval", out)
        loss = out.loss
        if training and self.state.global_step + 1 in self.inject_nan_steps:
            loss = loss * float("nan")  # test hook: a poisoned step
        if training and not torch.isfinite(loss.detach()).all():
            self._window_nonfinite = True
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Held-out pairs: the loss, and the reward metrics logged as `eval_rewards/...`."""
        inputs = dict(inputs)
        inputs.pop("skipped_records", None)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            out = self.pref_forward(inputs)
        self._record("eval", out)
        return out.loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None and self._pref_metrics[mode]:
            prefix = "eval_" if mode == "eval" else ""
            for k, values in self._pref_metrics[mode].items():
                logs[prefix + k] = sum(values) / len(values)
            self._pref_metrics[mode].clear()
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.reference is not None and self.args.should_save:
            save_file(self.reference.state_dict(), os.path.join(output_dir or self.args.output_dir, REFERENCE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.reference is None:
            return
        path = Path(resume_from_checkpoint) / REFERENCE_FILE
        if not path.is_file():
            raise UserError(f"resume_from_checkpoint: {resume_from_checkpoint} has no {REFERENCE_FILE} (not a "
                            f"checkpoint of a pref_loss={self.pref_loss} run): resume from one, or start afresh")
        self.reference.load_state_dict(load_file(str(path)))


def build_pref_datasets(cfg, vlm) -> tuple[PrefDataset, PrefDataset | None]:
    """Train (and held-out) preference pairs in the model's chat template; bad and over-long pairs skipped."""
    common = dict(fmt=vlm.chat_format, image_processor=vlm.image_processor, tokens_per_image=vlm.tokens_per_image,
                  image_folder=cfg.image_folder, max_length=cfg.max_length, image_token_id=vlm.image_token_id,
                  system_prompt=cfg.system_prompt, allow_absolute_paths=cfg.allow_absolute_paths,
                  strict=cfg.strict_data)
    train_ds = PrefDataset(list(cfg.data_path), **common)
    eval_ds = PrefDataset(list(cfg.eval_data_path), **common) if cfg.eval_data_path else None
    for name, ds in (("train", train_ds), ("eval", eval_ds)):
        if ds is not None:
            rep = ds.skip_report()
            log.info("%s preference data: %d pairs, %d skipped %s", name, rep["pairs"], rep["skipped"], rep["by_kind"])
    return train_ds, eval_ds
