"""The VLM: vision tower(s) -> projector -> LM placeholders.

Contract:
- `build_vlm(preset_or_config, **overrides) -> VLM` builds every part from a `VLMConfig` (or a
  preset name from `PRESETS`). `VLM(config, towers, projector, lm, tokenizer)` assembles given parts
  and checks, at build time, that the projector's input width is the towers' width and its output
  width the LM's embedding width (an error names both widths).
- `forward(input_ids [B, T], attention_mask [B, T] | None, pixel_values [n_images, 3, H, W] | None,
  labels [B, T] | None, image_counts [B] | None, image_features [n_images, T, C] | None, **kw)
  -> VLMOutput(loss, logits, past_key_values)`.
  `pixel_values` is the flat batch of every sample's images in sample order; each image fills exactly
  `tokens_per_image` placeholders (`image_token_id`) in the same order. Frozen towers (no parameter
  requires grad) run in eval mode under `no_grad`, in `config.tower_dtype` when set (`cast_frozen_towers`);
  their features are cast to the projector's dtype. `image_features [n_images, T, C]` (the towers'
  output, e.g. from a feature cache) may replace `pixel_values`: the towers are skipped.
  Labels are not shifted here (the LM loss shifts). With labels and no `return_logits=True`, the loss is
  computed at target positions only (chunked, `qwen.loss.supervised_loss`) for both LM backends, and
  `VLMOutput.logits` is computed lazily on first access. `cu_seqlens` / `position_ids` (packing) go to
  the qwen LM; the hf backend refuses `cu_seqlens`.
  In training mode a batch without any image still runs the projector (and trainable towers, in eval
  mode) on one blank image and adds `0 * rows.sum()`, so every rank uses the same parameters at every
  step (DDP without unused-parameter detection, FSDP, ZeRO-3); the loss value is unchanged.
- `generate(input_ids, attention_mask=None, pixel_values=None, **gen_kw) -> list[list[int]]` (new tokens
  only), `chat(images, messages, **gen_kw) -> str` and `chat_batch([(images, messages), ...]) -> [str]`
  (left-padded, one generate call); `stop_token_ids`, `pad_token_id` and `decode(ids)` are what any
  other front end needs.
- `save_pretrained(dir, trainable_only=False)` / `VLM.from_pretrained(dir, **overrides)`: see
  `model/checkpoint.py` (our format, LoRA adapters included) and `model/llava.py` (transformers
  `LlavaForConditionalGeneration` import).
- `merge_lora()` folds peft adapters into the LM; `gradient_checkpointing_enable()` forwards to the LM;
  `train()` keeps frozen towers in eval mode.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.config import PRESETS, VLMConfig, resolve_config
from model.parts import build_lm, build_tokenizer, build_towers, lm_width, torch_dtype
from model.placeholders import (
    LOSS_CHUNK_SIZE,
    causal_lm_loss,
    embed_with_placeholders,
    hf_hidden_states,
    hf_output_head,
    scatter_image_features,
    supervised_loss,
    supports_supervised_loss,
)
from model.projector import Projector, build_projector

__all__ = ["PRESETS", "VLM", "VLMConfig", "VLMOutput", "build_vlm"]

IMAGE_MARKER = "<image>"
HF_PLACEHOLDERS = ("<image>", "<|image_pad|>")


@dataclass(init=False)
class VLMOutput:
    """`loss`, `logits` `[B, T, V]`, `past_key_values`. When the loss was computed at target positions
    only, `logits_fn` computes the full logits on first access of `.logits` (training never reads them).
    A dataclass so that DDP finds the loss among its fields (it marks parameters unused otherwise)."""

    loss: torch.Tensor | None
    past_key_values: Any
    _logits: torch.Tensor | None
    _logits_fn: Any

    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor | None = None, past_key_values: Any = None,
                 logits_fn: Any = None):
        self.loss, self.past_key_values = loss, past_key_values
        self._logits, self._logits_fn = logits, logits_fn

    @property
    def logits(self) -> torch.Tensor | None:
        if self._logits is None and self._logits_fn is not None:
            self._logits, self._logits_fn = self._logits_fn(), None  # [B, T, V], once, on demand
        return self._logits


def _towers_frozen(towers: nn.Module) -> bool:
    return not any(p.requires_grad for p in towers.parameters())


class VLM(nn.Module):
    def __init__(
        self,
        config: VLMConfig,
        towers: nn.Module,
        projector: Projector,
        lm: nn.Module,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.towers = towers
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        d_vision, d_lm = int(towers.hidden_size), lm_width(lm)
        if projector.in_dim != d_vision:
            raise ValueError(
                f"projector input width {projector.in_dim} != vision tower width {d_vision} ({config.towers})"
            )
        if projector.out_dim != d_lm:
            raise ValueError(f"projector output width {projector.out_dim} != LM embedding width {d_lm} ({config.lm})")
        if projector.reduce is not None and towers.num_tokens != towers.grid[0] * towers.grid[1]:
            raise ValueError(
                f"token reduction {projector.reduce} needs patch tokens only, but the tower returns "
                f"{towers.num_tokens} tokens for a {towers.grid[0]}x{towers.grid[1]} grid (select='patch')"
            )
        self.tokens_per_image = projector.tokens_out(int(towers.num_tokens))
        self.image_token_id = self._resolve_image_token_id()
        tok_id = getattr(tokenizer, "image_token_id", None)
        if isinstance(tok_id, int) and tok_id != self.image_token_id:
            warnings.warn(
                f"VLM placeholder id {self.image_token_id} differs from the tokenizer's image_token_id {tok_id}: "
                f"chat() and training render with VLM.image_token_id; pass it as render(..., image_token_id=...) "
                f"elsewhere", stacklevel=2,
            )
        if config.lm_backend == "qwen":
            # QWenModel swaps the rows of this id; keep the LM and the VLM agreeing on it.
            lm.config.image_token_id = self.image_token_id

    def _resolve_image_token_id(self) -> int:
        if self.config.image_token_id is not None:
            return int(self.config.image_token_id)
        tok_id = getattr(self.tokenizer, "image_token_id", None)
        if isinstance(tok_id, int):
            return tok_id
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        for token in HF_PLACEHOLDERS:  # a transformers tokenizer: the usual placeholder tokens
            if token in vocab:
                return int(vocab[token])
        lm_id = getattr(self.lm.config, "image_token_id", None)
        if lm_id is None:
            raise ValueError(
                "no image placeholder id: set VLMConfig.image_token_id (the tokenizer and the LM config have none)"
            )
        return int(lm_id)

    def train(self, mode: bool = True) -> VLM:
        super().train(mode)
        if _towers_frozen(self.towers):
            self.towers.eval()  # frozen towers never run dropout / batch-norm updates
        return self

    # ----- images ------------------------------------------------------------------------------------
    @property
    def image_processor(self):
        return self.towers.processor

    def cast_frozen_towers(self) -> None:
        """Put frozen towers in `config.tower_dtype` (e.g. bf16); trainable towers stay in `config.dtype`."""
        want = self.config.tower_dtype if _towers_frozen(self.towers) else None
        self.towers.to(torch_dtype(want or self.config.dtype))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images * tokens_per_image, D_lm] projected rows, image by image."""
        tower_dtype = next(self.towers.parameters(), pixel_values).dtype
        if _towers_frozen(self.towers):
            self.towers.eval()  # frozen towers never run dropout / batch-norm updates
            with torch.no_grad():
                feats = self.towers(pixel_values.to(tower_dtype))  # [N, T, C]
        else:
            feats = self.towers(pixel_values.to(tower_dtype))
        return self.project_features(feats)

    def project_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Tower output [n_images, T, C] (e.g. from a feature cache) -> [n_images * tokens_per_image, D_lm]."""
        want = (int(self.towers.num_tokens), int(self.towers.hidden_size))
        if feats.dim() != 3 or tuple(feats.shape[1:]) != want:
            raise ValueError(f"image features must be [n_images, {want[0]}, {want[1]}] (the towers' output), "
                             f"got {tuple(feats.shape)}")
        # Features of a bf16 tower (or a cache) are cast to the projector's dtype.
        proj_dtype = next(self.projector.parameters(), feats).dtype
        rows = self.projector(feats.to(proj_dtype))  # [N, tokens_per_image, D]
        assert rows.shape[1] == self.tokens_per_image, (rows.shape, self.tokens_per_image)
        return rows.reshape(-1, rows.shape[-1])  # [N * tokens_per_image, D]

    def _image_rows(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_counts: Any,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        if pixel_values is not None and image_features is not None:
            raise ValueError("give either pixel_values or image_features (cached tower output), not both")
        given = pixel_values if image_features is None else image_features
        n_images = 0 if given is None else int(given.shape[0])
        if image_counts is not None:
            counts = [int(c) for c in (image_counts.tolist() if torch.is_tensor(image_counts) else image_counts)]
            if len(counts) != input_ids.shape[0] or sum(counts) != n_images:
                raise ValueError(f"image_counts {counts} do not match {input_ids.shape[0]} samples / {n_images} images")
            slots = (input_ids == self.image_token_id).sum(dim=1).tolist()
            for b, (c, s) in enumerate(zip(counts, slots)):
                if s != c * self.tokens_per_image:
                    raise ValueError(
                        f"sample {b}: {s} image placeholders but {c} image(s) x {self.tokens_per_image} tokens"
                    )
        if n_images == 0:
            return None
        if image_features is not None:
            return self.project_features(image_features)  # cached tower output: the tower is skipped
        return self.encode_images(pixel_values)

    def _idle_vision_anchor(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """A zero scalar that runs the projector (and trainable towers) on one blank image when a training
        batch has no image at all, None otherwise. Why: under DDP with unused-parameter detection off, FSDP
        or ZeRO-3, every rank must use the same parameters at every step, or the ranks whose batch did use
        them wait forever in the gradient all-reduce."""
        if rows is not None or not (self.training and torch.is_grad_enabled()):
            return None
        if _towers_frozen(self.towers) and not any(p.requires_grad for p in self.projector.parameters()):
            return None
        device = next(self.projector.parameters()).device
        size = int(self.towers.image_size)
        was_training = self.towers.training
        self.towers.eval()  # batch-norm running statistics must not see the blank image
        try:
            blank = self.encode_images(torch.zeros(1, 3, size, size, device=device))  # [tokens_per_image, D]
        finally:
            self.towers.train(was_training)
        return blank.sum() * 0.0

    # ----- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_counts: Any = None,
        image_features: torch.Tensor | None = None,
        **kw: Any,
    ) -> VLMOutput:
        # `image_features` [n_images, T, C]: cached tower output (dataprocess/cache_features.py).
        rows = self._image_rows(input_ids, pixel_values, image_counts, image_features)  # [n_slots, D] | None
        anchor = self._idle_vision_anchor(rows)  # 0-valued scalar, or None
        if self.config.lm_backend == "qwen":
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, image_features=rows, labels=labels, **kw)
            if anchor is not None and out.loss is not None:
                out.loss = out.loss + anchor
            # `out.logits` may be lazy (supervised-only loss): read it only when the caller does.
            return VLMOutput(out.loss, past_key_values=getattr(out, "past_key_values", None),
                             logits_fn=lambda: out.logits)
        if kw.pop("cu_seqlens", None) is not None:
            raise ValueError("packed sequences (cu_seqlens) need lm_backend='qwen'; the hf LM path takes "
                             "padded batches only (set packing=false)")
        embeds = self.embed_inputs(input_ids, rows)  # [B, T, D]
        if anchor is not None:
            embeds = embeds + anchor.to(embeds.dtype)
        return_logits = kw.pop("return_logits", None)
        if labels is not None and return_logits is not True and supports_supervised_loss(self.lm):
            # Supervised-only logits: the base model's hidden states, then the chunked loss on the head.
            kw.setdefault("use_cache", False)  # a training forward needs no KV cache
            hidden, pkv = hf_hidden_states(self.lm, embeds, attention_mask, **kw)  # [B, T, D]
            head = hf_output_head(self.lm)
            loss = supervised_loss(hidden, head, labels, chunk_size=LOSS_CHUNK_SIZE)
            return VLMOutput(loss, past_key_values=pkv, logits_fn=lambda: head(hidden))
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, **kw)
        loss = causal_lm_loss(out.logits, labels) if labels is not None else None
        return VLMOutput(loss, out.logits, getattr(out, "past_key_values", None))

    def embed_inputs(self, input_ids: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """LM input embeddings with image rows at the placeholders (the hf path; qwen does this inside)."""
        embeds = embed_with_placeholders(self.lm.get_input_embeddings(), input_ids, self.image_token_id)
        return scatter_image_features(input_ids, embeds, rows, self.image_token_id)

    # ----- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **gen_kw: Any,
    ) -> list[list[int]]:
        rows = self._image_rows(input_ids, pixel_values, None)
        if self.config.lm_backend == "qwen":
            return self.lm.generate(input_ids, attention_mask=attention_mask, image_features=rows, **gen_kw)
        stop = gen_kw.pop("stop_token_ids", None)
        if stop:
            gen_kw["eos_token_id"] = list(stop)
        gen_kw.setdefault("do_sample", False)
        embeds = self.embed_inputs(input_ids, rows)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # With inputs_embeds only, transformers returns just the new tokens.
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **gen_kw)
        stop_ids = set(stop or [])
        results = []
        for seq in out.tolist():
            cut = next((i for i, t in enumerate(seq) if t in stop_ids), len(seq))
            results.append(seq[:cut])
        return results

    def chat_ids(self, messages: list[dict], n_images: int) -> list[int]:
        """ChatML prompt ids with each `<image>` expanded to start + N x placeholder + end, plus the reply
        header: the same rendering as training (`dataset.template.render`), with this model's placeholder."""
        from dataset.sample import Sample
        from dataset.template import render

        tok = self.tokenizer
        if tok is None or not hasattr(tok, "im_start_id"):
            raise ValueError("chat needs a Qwen tokenizer (set VLMConfig.tokenizer to a directory holding one)")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"chat: messages[{i}] needs role system|user|assistant and str content, got {m!r}")
        n_markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
        if n_markers != n_images:
            raise ValueError(f"chat: {n_markers} {IMAGE_MARKER} marker(s) in the messages but {n_images} image(s)")
        sample = Sample(id="chat", messages=list(messages), images=[f"<image {i}>" for i in range(n_images)])
        return render(sample, tok, self.tokens_per_image, add_generation_prompt=True,
                      image_token_id=self.image_token_id).input_ids

    # ----- what every caller of generate needs (front ends, evaluation, serving) --------------------
    @property
    def stop_token_ids(self) -> list[int]:
        """Generation for chat stops at any of these ids (end of turn first)."""
        tok = self.tokenizer
        return [tok.im_end_id, tok.im_start_id]

    @property
    def pad_token_id(self) -> int:
        """The id that left-pads batched prompts (masked out, never attended)."""
        return int(self.tokenizer.eod_id)

    def decode(self, ids: list[int]) -> str:
        """New token ids -> text, without special tokens. Embedding tables have spare rows past the
        vocabulary (151936 vs 151851 for Qwen); an undertrained model can emit them, and they have no text."""
        return self.tokenizer.decode([t for t in ids if t < len(self.tokenizer)], skip_special_tokens=True)

    @staticmethod
    def _place_images(images: list, messages: list[dict]) -> list[dict]:
        """A copy of `messages`; with images but no `<image>` marker, the markers go before the first user
        message's text."""
        messages = [dict(m) for m in messages]
        if images and not any(IMAGE_MARKER in m.get("content", "") for m in messages):
            first = next(i for i, m in enumerate(messages) if m.get("role") == "user")
            messages[first]["content"] = IMAGE_MARKER * len(images) + "\n" + messages[first]["content"]
        return messages

    @torch.no_grad()
    def chat_batch(self, conversations: list[tuple[list, list[dict]]], **gen_kw: Any) -> list[str]:
        """Answer several conversations together: `[(images, messages), ...] -> [reply, ...]`, left-padded
        into one batch (greedy unless `do_sample`). Each reply equals `chat(images, messages)` alone."""
        if not conversations:
            return []
        device = next(self.parameters()).device
        ids_list, all_images = [], []
        for images, messages in conversations:
            ids_list.append(self.chat_ids(self._place_images(images, messages), len(images)))
            all_images += list(images)
        width = max(len(x) for x in ids_list)
        pad = self.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids_list], device=device)  # [B, T]
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids_list], device=device)
        pixel_values = self.image_processor(all_images).to(device) if all_images else None
        gen_kw.setdefault("max_new_tokens", 128)
        gen_kw.setdefault("stop_token_ids", self.stop_token_ids)
        return [self.decode(new) for new in self.generate(input_ids, mask, pixel_values, **gen_kw)]

    @torch.no_grad()
    def chat(self, images: list, messages: list[dict], **gen_kw: Any) -> str:
        """Answer the last user turn. Images fill the `<image>` markers in order (one is prepended to the
        first user message when there are images but no markers)."""
        messages = self._place_images(images, messages)
        ids = self.chat_ids(messages, len(images))
        device = next(self.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        pixel_values = self.image_processor(list(images)).to(device) if images else None
        gen_kw.setdefault("max_new_tokens", 128)
        gen_kw.setdefault("stop_token_ids", self.stop_token_ids)
        return self.decode(self.generate(input_ids, torch.ones_like(input_ids), pixel_values, **gen_kw)[0])

    # ----- training helpers --------------------------------------------------------------------------
    def gradient_checkpointing_enable(self) -> None:
        if self.config.lm_backend == "hf":
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.lm.gradient_checkpointing_enable()

    def merge_lora(self) -> None:
        """Fold peft LoRA adapters into the LM weights (no-op without adapters); 4-bit (QLoRA) base weights
        are dequantised first, so the adapters fold into float weights and nothing is re-quantised."""
        from peft import PeftModel

        from model.quant import dequantize_lm, has_4bit

        if has_4bit(self.lm):
            dequantize_lm(self)

        if isinstance(self.lm, PeftModel):
            self.lm = self.lm.merge_and_unload()
        self.config.lora = None

    # ----- checkpoints -------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, trainable_only: bool = False) -> None:
        from model.checkpoint import save_vlm

        save_vlm(self, out_dir, trainable_only=trainable_only)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> VLM:
        from model.checkpoint import load_vlm

        return load_vlm(path, **overrides)


def build_vlm(preset_or_config: str | dict | VLMConfig, **overrides: Any) -> VLM:
    """Build every part named by the config (a preset name, a dict or a VLMConfig)."""
    config = resolve_config(preset_or_config, **overrides)
    if config.init_from is not None:
        from model.llava import import_llava

        return import_llava(config.init_from, config)
    lm = build_lm(config)
    towers = build_towers(config)
    if config.freeze_towers:
        towers.requires_grad_(False)
        towers.eval()
    grid = towers.grid if config.reduce is not None else None
    projector = build_projector(
        config.projector, int(towers.hidden_size), lm_width(lm), reduce=config.reduce,
        reduce_factor=config.reduce_factor, grid=grid,
    )
    vlm = VLM(config, towers, projector, lm, build_tokenizer(config))
    vlm = vlm.to(torch_dtype(config.dtype))
    if config.tower_dtype is not None and config.freeze_towers:
        vlm.cast_frozen_towers()
    return vlm
