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
resumed run is the one the run started with. `precompute_ref_logps`: the reference log-probs of every train and
eval pair are computed once (first step, after a resume has loaded the snapshot) and kept by pair id in
`reference_logps.json`; the steps then run the policy forward only. Single process only (trainer/run.py refuses more): the pair
forward does not go through a DDP / FSDP wrapper's forward.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import UserError
from ..dataset.pref_data import PairCollator, PrefDataset
from ..model.preference import Reference, pair_features, pair_logps, reference_logps
from .hf_trainer import VLMTrainer, unwrap
from .pref_loss import REFERENCE_FREE, PrefLoss, preference_loss, reward_metrics

REFERENCE_FILE = "reference.safetensors"
REF_LOGPS_FILE = "reference_logps.json"
LOSS_KEYS = ("beta", "label_smoothing", "rpo_alpha", "simpo_gamma")
log = logging.getLogger("qwenvl_lab.trainer")


class PairBatches:
    """`PairCollator`'s batch as the plain dict the Trainer moves to the device, with the pair ids and the skip
    records of bad pairs as keys (attributes would not survive the move)."""

    def __init__(self, pad_id: int):
        self.collator = PairCollator(pad_id)

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collator(items)
        return {**batch, "pair_ids": list(batch.ids), "skipped_records": list(batch.skipped)}


class PrefTrainer(VLMTrainer):
    def __init__(self, *args, pref_loss: str, pref_settings: dict, precompute_ref_logps: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pref_loss, self.pref_settings = pref_loss, {k: pref_settings[k] for k in LOSS_KEYS}
        # A mean over pairs, not over target tokens: the Trainer divides each micro-batch by the accumulation.
        self.model_accepts_loss_kwargs = False
        self.reference = None if pref_loss in REFERENCE_FREE else Reference(unwrap(self.model))
        self.precompute_ref_logps = precompute_ref_logps and self.reference is not None
        self._ref_table: dict | None = None  # {"train" | "eval": {pair id: [chosen, rejected]}}
        self._pref_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _policy_and_reference(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Policy log-probs `[2B]`, target counts `[2B]` and reference log-probs `[2B]` (None: reference-free)."""
        vlm = unwrap(self.model)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]  # [2B, T]
        counts, pixels = inputs["image_counts"], inputs.get("pixel_values")  # [B], [n_images, 3, H, W]
        feats = pair_features(vlm, pixels)  # the towers once for the pairs' images
        logps, n_targets = pair_logps(vlm, ids, mask, labels, counts, feats)  # [2B], [2B]
        if self.reference is None:
            return logps, n_targets, None
        if self.precompute_ref_logps:
            table = self._reference_table("train" if self.model.training else "eval")
            pairs = torch.tensor([table[i] for i in inputs["pair_ids"]], dtype=torch.float32)  # [B, 2]
            return logps, n_targets, pairs.t().reshape(-1).to(logps.device)  # [chosen...; rejected...]
        return logps, n_targets, reference_logps(vlm, self.reference, ids, mask, labels, counts, feats, pixels)

    def pref_forward(self, inputs: dict) -> PrefLoss:
        logps, n_targets, ref = self._policy_and_reference(inputs)
        B = logps.shape[0] // 2
        return preference_loss(self.pref_loss, logps[:B], logps[B:], n_targets[:B], n_targets[B:],
                               None if ref is None else ref[:B], None if ref is None else ref[B:],
                               **self.pref_settings)

    def _reference_table(self, mode: str) -> dict:
        """The precomputed reference log-probs by pair id: read from the run directory, or computed once (with
        the snapshot a resume has loaded by now) and written there."""
        if self._ref_table is None:
            path = Path(self.args.output_dir) / REF_LOGPS_FILE
            if path.is_file():
                self._ref_table = json.loads(path.read_text(encoding="utf-8"))
            else:
                self._ref_table = {"train": self._reference_pass(self.train_dataset),
                                   "eval": self._reference_pass(self.eval_dataset)}
                if self.args.should_save:
                    path.write_text(json.dumps(self._ref_table), encoding="utf-8")
                log.info("reference log-probs precomputed for %d train and %d eval pairs (%s)",
                         len(self._ref_table["train"]), len(self._ref_table["eval"]), path)
        return self._ref_table[mode]

    def _reference_pass(self, ds: PrefDataset | None) -> dict[str, list[float]]:
        if ds is None:
            return {}
        seen = Counter(p.id for p in ds.pairs)
        twice = [i for i, n in seen.items() if n > 1]
        if twice:
            raise UserError(f"precompute_ref_logps keeps reference log-probs by pair id, but {len(twice)} id(s) appear "
                            f"more than once (e.g. {twice[0]!r}): give the pairs unique ids or set it false")
        vlm, collate, step = unwrap(self.model), PairBatches(unwrap(self.model).pad_token_id), \
            self.args.per_device_eval_batch_size
        table = {}
        for start in range(0, len(ds), step):
            batch = self._prepare_inputs(collate([ds[i] for i in range(start, min(start + step, len(ds)))]))
            if batch["skipped_records"] and self.skip_sink is not None and ds is self.train_dataset:
                self.skip_sink(batch["skipped_records"])
            feats = pair_features(vlm, batch["pixel_values"])
            ref = reference_logps(vlm, self.reference, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                  batch["image_counts"], feats, batch["pixel_values"])  # [2B]
            B = len(batch["pair_ids"])
            for b, pid in enumerate(batch["pair_ids"]):
                table[pid] = [ref[b].item(), ref[B + b].item()]
        return table

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
