"""The Hugging Face Trainer, adapted to the VLM.

What changes from the stock Trainer (DDP / FSDP / DeepSpeed, the loop, logging all stay its own):
* optimizer: AdamW over `trainer.optim.param_groups` (one LR per part, no decay on biases and norms);
* loss: token-normalised over the whole gradient-accumulation window: each micro-batch contributes
  `sum of its token losses / target tokens in the window`, so micro-batch size and accumulation do not
  change the loss (the LM returns a per-token mean; we rescale it by its own token count);
* checkpoints: trainable weights through `VLM.save_pretrained(trainable_only=True)`; optimizer,
  scheduler and RNG states as safetensors + JSON (`trainer.state_io`), never pickle;
* sampler: the dataset's own length-grouped sampler, so lengths come from the cheap estimate instead of
  loading every sample once.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer

from trainer import state_io
from trainer.optim import describe_groups, param_groups

log = logging.getLogger(__name__)

OPTIMIZER_STATE = "optimizer_state"
SCHEDULER_STATE = "scheduler_state"


def unwrap(model):
    """The VLM under DDP/FSDP/DeepSpeed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


class VLMTrainer(Trainer):
    def __init__(self, *args, lr_settings: dict, length_sampler_fn=None, skip_sink=None, **kwargs):
        self.lr_settings = lr_settings
        self.length_sampler_fn = length_sampler_fn
        self.skip_sink = skip_sink  # receives the skip records of bad samples met in DataLoader workers
        super().__init__(*args, **kwargs)
        # We normalise by target tokens ourselves (compute_loss), so the Trainer must count them over
        # the accumulation window (shifted, as the LM's loss is) and must not divide by the step count.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    # ---- optimizer -------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = param_groups(unwrap(opt_model), weight_decay=self.args.weight_decay, **self.lr_settings)
            print("optimizer groups:\n" + describe_groups(groups), flush=True)
            self.optimizer = torch.optim.AdamW(
                groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer

    # ---- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped_records", None)
        if skipped and self.skip_sink is not None:
            self.skip_sink(skipped)
        outputs = model(**inputs)
        loss = outputs.loss
        if num_items_in_batch is not None:
            # mean over this micro-batch's targets -> its share of the window's token mean
            n_here = (inputs["labels"][..., 1:] != -100).sum()
            loss = loss * n_here.to(loss.dtype) / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP averages gradients over ranks, and num_items_in_batch already counts all ranks.
                loss = loss * self.args.world_size
        return (loss, outputs) if return_outputs else loss

    # ---- sampler ---------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if self.length_sampler_fn is not None:
            return self.length_sampler_fn(self.args)
        return super()._get_train_sampler(train_dataset)

    # ---- checkpoints -----------------------------------------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        unwrap(self.model).save_pretrained(output_dir, trainable_only=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from model.checkpoint import load_trainable_weights

        load_trainable_weights(unwrap(model or self.model), resume_from_checkpoint)

    def _plain_state_backend(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self._plain_state_backend():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            state_io.save_state(self.optimizer.state_dict(), output_dir, OPTIMIZER_STATE)
            state_io.save_state(self.lr_scheduler.state_dict(), output_dir, SCHEDULER_STATE)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        if not self._plain_state_backend() or not state_io.has_state(checkpoint, OPTIMIZER_STATE):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.optimizer.load_state_dict(state_io.load_state(checkpoint, OPTIMIZER_STATE))
        self.lr_scheduler.load_state_dict(state_io.load_state(checkpoint, SCHEDULER_STATE))

    def _save_rng_state(self, output_dir):
        os.makedirs(output_dir, exist_ok=True)
        state_io.save_state(state_io.rng_state(), output_dir, f"rng_state_{self.args.process_index}")

    def _load_rng_state(self, checkpoint):
        if checkpoint is None:
            return
        name = f"rng_state_{self.args.process_index}"
        if not state_io.has_state(checkpoint, name):
            log.warning("no RNG state %s in %s: resumed data order and dropout may differ", name, checkpoint)
            return
        state_io.set_rng_state(state_io.load_state(checkpoint, name))
