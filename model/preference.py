"""The model side of preference tuning: one forward over [chosen; rejected] with each pair's images encoded
once, per-sequence log-probabilities without full-vocabulary logits, and the reference as the same model.

Contract
--------
* `pair_features(vlm, pixel_values [n_images, 3, H, W] | None) -> [n_images, T, C] | None`: the towers' output
  for each PAIR's images (a batch from dataset/pref_data.py `PairCollator`), one tower call per step: frozen
  towers run under `no_grad` and their features serve the policy and the reference passes alike.
* `pair_logps(vlm, input_ids [2B, T], attention_mask, labels, image_counts [B], feats) -> (logps [2B], counts
  [2B])`: the features are projected once and the rows placed in both the chosen row and the rejected row of
  each pair (the placeholders of row b and row B + b take the same rows); the LM runs once over the 2B rows and
  `core.loss.sequence_logps` sums each row's target log-probabilities at target positions only (an LM whose
  logits are post-processed, e.g. soft-capped, goes through its own full logits). Fixed-resolution models
  only (anyres / native resolution raise ValueError).
* `Reference(vlm)`: the reference policy without a second model. Built before training, it keeps a frozen
  copy of every trainable parameter that is not a LoRA tensor (projector, token rows, trainable towers or LM
  parts) and of the floating-point buffers of their modules (a training tower's batch-norm statistics). `with ref.active(): ...` runs the model with the LoRA adapters disabled (peft's `disable_adapter`)
  and those snapshot tensors swapped in (the parameters' storage is exchanged, nothing is copied), in eval
  mode and without gradient; everything is put back on exit. `state_dict()` / `load_state_dict(sd)` carry the
  snapshot through a checkpoint (a resumed run compares against the same reference).
  `reference_logps(vlm, ref, batch, feats)` is `pair_logps` under `ref.active()`.
  Why a snapshot: parameters other than the adapters train too (the projector, new token rows); with adapters
  off alone the reference would drift with them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..core.loss import IGNORE_INDEX, sequence_logps, shift_targets
from .model import VLM, _towers_frozen


def pair_features(vlm: VLM, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
    """[n_images, 3, H, W] (each pair's images once) -> tower output [n_images, T, C]; None without images."""
    if pixel_values is None or pixel_values.shape[0] == 0:
        return None
    if vlm.resolution.mode != "fixed":
        raise ValueError(f"preference tuning supports fixed-resolution models; this one is {vlm.resolution.mode!r}")
    tower_dtype = next(vlm.towers.parameters(), pixel_values).dtype
    if _towers_frozen(vlm.towers):
        vlm.towers.eval()
        with torch.no_grad():
            return vlm.towers(pixel_values.to(tower_dtype))  # [n_images, T, C]
    return vlm.towers(pixel_values.to(tower_dtype))


def _both_sides(vlm: VLM, input_ids: torch.Tensor, image_counts, feats: torch.Tensor | None) -> torch.Tensor | None:
    """Projected rows for [chosen; rejected]: each pair's rows twice, once per side, [2 * n_slots, D]."""
    counts = [int(c) for c in (image_counts.tolist() if torch.is_tensor(image_counts) else image_counts or [])]
    n_pairs = input_ids.shape[0] // 2
    if input_ids.shape[0] != 2 * n_pairs or (counts and len(counts) != n_pairs):
        raise ValueError(f"a preference batch has 2 rows per pair: {input_ids.shape[0]} rows, {len(counts)} pairs")
    n_images = 0 if feats is None else int(feats.shape[0])
    if sum(counts) != n_images:
        raise ValueError(f"image_counts {counts} do not match {n_images} images")
    if counts:
        vlm._check_slots(input_ids, counts + counts, [vlm.tokens_per_image] * (2 * n_images))
    if feats is None:
        return None
    rows = vlm.project_features(feats)  # [n_images * T', D], projected once
    return torch.cat([rows, rows])  # the chosen rows' placeholders, then the rejected rows'


def full_logits_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums from full logits `[B, T, V]` (LMs that post-process logits; tests compare against it)."""
    targets = shift_targets(labels)  # [B, T-1]
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
    tok = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep  # [B, T-1]
    return tok.sum(1), keep.sum(1)


def pair_logps(vlm: VLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
               image_counts, feats: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed target log-probabilities `[2B]` and target counts `[2B]` (see the module docstring)."""
    rows = _both_sides(vlm, input_ids, image_counts, feats)
    embeds = vlm.embed(input_ids, rows)  # [2B, T, D]
    bb, lm = vlm.backbone, vlm.lm
    if not bb.plain_head(lm):
        logits, _ = bb.full_logits(lm, embeds, attention_mask)
        return full_logits_logps(logits, labels)
    hidden, _ = bb.hidden_states(lm, embeds, attention_mask, use_cache=False)  # [2B, T, D]
    return sequence_logps(hidden, bb.output_head(lm), labels, vlm.loss_chunk_size)


def is_lora(name: str) -> bool:
    return "lora_" in name


class Reference:
    """The reference policy: adapters off + a frozen snapshot of the other trainable tensors."""

    def __init__(self, vlm: VLM):
        self.vlm = vlm
        self.snapshot: dict[str, torch.Tensor] = {n: t.detach().clone() for n, t in self._moving(vlm).items()}

    @staticmethod
    def _moving(vlm: VLM) -> dict[str, torch.Tensor]:
        """What training changes besides the adapters: trainable parameters, and the floating-point buffers of
        the modules that hold them (a training tower's batch-norm running statistics)."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in vlm.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            own = [(n, p) for n, p in own if not is_lora(f"{prefix}.{n}")]
            for n, p in own:
                out[f"{prefix}.{n}" if prefix else n] = p
            if own:
                for n, b in module.named_buffers(recurse=False):
                    if b is not None and b.is_floating_point():
                        out[f"{prefix}.{n}" if prefix else n] = b
        return out

    def _params(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.vlm.named_parameters())
        tensors.update(self.vlm.named_buffers())
        missing = [n for n in self.snapshot if n not in tensors]
        if missing:
            raise ValueError(f"reference snapshot names tensors the model lacks: {missing[:3]}")
        return {n: tensors[n] for n in self.snapshot}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        vlm, params = self.vlm, self._params()
        was_training = vlm.training
        disable = getattr(vlm.lm, "disable_adapter", None)
        saved = {}
        with torch.no_grad(), (disable() if disable is not None else contextlib.nullcontext()):
            try:
                for n, p in params.items():
                    saved[n], p.data = p.data, self.snapshot[n].to(p.device)  # storage swap, no copy
                vlm.eval()
                yield
            finally:
                for n, data in saved.items():
                    params[n].data = data
                vlm.train(was_training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.contiguous() for n, t in self.snapshot.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.snapshot):
            extra, gone = sorted(set(state) - set(self.snapshot)), sorted(set(self.snapshot) - set(state))
            raise ValueError(f"reference snapshot does not fit this model: unexpected {extra[:3]}, missing {gone[:3]}")
        self.snapshot = {n: t.detach().clone().to(self.snapshot[n]) for n, t in state.items()}


def reference_logps(vlm: VLM, ref: Reference, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    labels: torch.Tensor, image_counts, feats: torch.Tensor | None,
                    pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """`[2B]` reference log-probabilities; frozen towers' features are reused, trainable towers rerun."""
    with ref.active():
        if not _towers_frozen(vlm.towers) and pixel_values is not None:
            feats = pair_features(vlm, pixel_values)  # the snapshot's tower weights
        logps, _ = pair_logps(vlm, input_ids, attention_mask, labels, image_counts, feats)
    return logps
