"""A released VLM that does not fit our own VLM (Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM) behind the same surface.

`ReleasedVLM(family, model, processor)` wraps the transformers model of a wrapper family (model/families.py,
`native=False`) and its processor, both loaded from the checkpoint directory: the model's own vision tower,
merger and M-RoPE (Idefics3 / SmolVLM: SigLIP tower, pixel-shuffle connector, Llama LM) run unchanged, so its
outputs are transformers' by construction. Nothing here names a family: what differs is read from its entry
(model/families.py: prefixes, extra and per-sample inputs, resolution keys) and from its processor (each image's
span is `processor.replace_image_token`, the text the processor itself puts in place of the image token).

Contract (the surface our VLM offers, so train.py / test.py / evaluation use it unchanged where they can):
- `ReleasedVLM.from_pretrained(dir, dtype=None, **resolution)`: `resolution` keys are the family's
  `resolution_keys` (Qwen2-VL: `min_pixels`, `max_pixels`; Idefics3 / SmolVLM: `size`, `max_image_size`,
  `do_image_splitting`, an int N for a `{"longest_edge": ...}` setting meaning `{"longest_edge": N}`), set on the
  image processor; any other key, or a tile side other than the tower's image_size, is a `UserError` naming it.
- `forward(input_ids [B, T], attention_mask [B, T], labels [B, T] | None, pixel_values, image_grid_thw |
  pixel_attention_mask, ...)`
  -> `ReleasedOutput(loss, logits [B, T, V])`; the loss is `core.loss.full_logits_loss` (labels shifted
  there, the one place), mean fp32 CE over assistant targets.
- `render(sample, images, max_length)` -> `{"input_ids", "labels"}` plus the processor's image inputs: the
  prompt rendered with the checkpoint's own chat template (dataset/hf_chat.py), each image's span expanded
  as the processor does, labels on assistant tokens only, every span token -100.
- `image_tokens(images)` -> one `ImageSpan` per image: an int (its feature rows: the image tokens in its span)
  carrying `.text`, the processor's span; `chat_ids` needs them (a bare count cannot say where Idefics3's tile
  markers go). `image_inputs(images)`: ONE conversation's images through the image processor (flat, or as
  one nested list for a family with `per_sample_inputs`: `[1, n, ...]`). `chat_ids(messages, n_images,
  image_tokens)`, `generate(...) -> [[new ids]]` (the model's own generate, greedy by default, cut before
  the first stop id), `chat(images, messages)`, `chat_batch([(images, messages), ...])`, `decode`,
  `stop_token_ids`, `pad_token_id`, `save_pretrained(dir)` (model + processor, the released layout again),
  `merge_lora()` (adapters folded in; `python -m qwenvl_lab.model.merge` then writes the released layout).
- `tokens_per_image` is None: a span's length depends on the image's size.
- Serving: the family's `serving` line says how (Qwen2-VL: through `generate`, not our engine).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoProcessor

from ..core.errors import UserError
from ..core.loss import full_logits_loss
from ..dataset.hf_chat import expand_images, hf_messages, render_hf, stack_image_inputs
from ..dataset.hf_template import offsets_tokenizer
from ..dataset.sample import IMAGE_MARKER, Sample
from .families import Family, family_of

LORA_DIR = "lora"
TRAINABLE_FILE = "trainable.safetensors"
RELEASED_FILE = "released.json"


class ImageSpan(int):
    """One image's feature rows (the image tokens of its span), carrying `text`: the processor's span for it."""

    text: str

    def __new__(cls, rows: int, text: str = "") -> ImageSpan:  # the default: unpickling passes the int only
        span = super().__new__(cls, rows)
        span.text = text
        return span


@dataclass
class ReleasedOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [B, T, V]


class ReleasedVLM(nn.Module):
    """The transformers model of a wrapper family with its processor, behind our VLM's surface."""

    tokens_per_image = None

    def __init__(self, family: Family, model: nn.Module, processor: Any, source: str = ""):
        """`processor=None`: the model alone (the memory plan's meta-device skeleton); nothing renders text."""
        super().__init__()
        self.family = family
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        self.source = source
        self.trained_tensors: list[str] = []  # transformers names of the non-LoRA tensors a trained run holds
        self.image_token = family.notes["image_token"]
        if processor is None:
            self.image_token_id = None
            return
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if not getattr(self.tokenizer, "is_fast", False):  # labels come from its character offsets
            raise UserError(f"{source}: the checkpoint's tokenizer has no tokenizer.json (a fast tokenizer is needed); "
                            "save it with transformers' AutoTokenizer.save_pretrained first")
        if getattr(self.tokenizer, "chat_template", None) is None and getattr(processor, "chat_template", None) is None:
            raise UserError(f"{source}: the checkpoint has no chat template (chat_template.jinja / .json or "
                            "tokenizer_config.json chat_template)")

    @property
    def config(self):
        return self.model.config

    def _hf(self) -> nn.Module:
        """The transformers model under a peft wrapper, if any."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def lm(self) -> nn.Module:
        """Its language model (the trainer reads its config; LoRA lives inside it)."""
        return self._hf().get_submodule(self.family.lm[0])

    @property
    def towers(self) -> nn.ModuleList:
        """Its vision modules and projector (the family's prefixes), as one list; the weights stay in `model`."""
        hf = self._hf()
        return nn.ModuleList([hf.get_submodule(p) for p in (*self.family.vision, *self.family.projector)])

    def prepare_attention(self, compute_dtype: torch.dtype | None = None) -> str | None:
        """The model's own attention (transformers' `attn_implementation`): nothing to choose here."""
        return getattr(self.model.config, "_attn_implementation", None)

    def gradient_checkpointing_enable(self) -> None:
        self._hf().gradient_checkpointing_enable()

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, **resolution: Any) -> ReleasedVLM:
        """A released directory, or one written by `save_pretrained(trainable_only=True)` (its released.json
        names the base; the PEFT adapter and the other trained tensors go on top)."""
        trained = Path(path) / RELEASED_FILE
        if trained.is_file():
            return cls._from_trained(Path(path), json.loads(trained.read_text())["base"], dtype, resolution)
        family = family_of(path)
        if family is None or family.native:
            raise UserError(f"{path}: not a released wrapper family (config.json model_type)")
        for key in resolution:
            if key not in family.resolution_keys:
                raise UserError(f"{key}: not a resolution key of {family.name} (use {', '.join(family.resolution_keys)})")
        try:  # before the weights: a missing package fails at once
            processor = AutoProcessor.from_pretrained(str(path))
        except ImportError as e:  # a processor that needs a package (SmolVLM: num2words)
            raise UserError(f"{path}: its processor cannot load: {e}") from None
        model = getattr(transformers, family.hf_class).from_pretrained(str(path), dtype=dtype)
        for key, value in resolution.items():
            _set_resolution(processor.image_processor, model.config, key, value)
        return cls(family, model, processor, str(path)).eval()

    @classmethod
    def _from_trained(cls, path: Path, base: str, dtype: torch.dtype | None, resolution: dict) -> ReleasedVLM:
        vlm = cls.from_pretrained(base, dtype=dtype, **resolution)
        if (path / LORA_DIR / "adapter_config.json").is_file():
            from peft import PeftModel  # heavy: only for a trained adapter

            vlm.model = PeftModel.from_pretrained(vlm.model, str(path / LORA_DIR))
        hf = vlm._hf()
        missing = set(load_file(str(path / TRAINABLE_FILE))) - set(hf.state_dict())
        if missing:
            raise UserError(f"{path / TRAINABLE_FILE}: tensors {sorted(missing)[:3]} are not in {base}")
        hf.load_state_dict(load_file(str(path / TRAINABLE_FILE)), strict=False)
        vlm.source = str(base)  # a later save points at the released base again
        vlm.trained_tensors = sorted(load_file(str(path / TRAINABLE_FILE)))  # what model/released_export.py saves
        return vlm.eval()

    def lora_target_regex(self, targets: str) -> str:
        """peft's full-name regex for `targets` (module-name suffixes) inside this family's LM only."""
        alts = "|".join(re.escape(t.strip()) for t in targets.split("|") if t.strip())
        if not alts:
            raise UserError("lora.targets is empty")
        return rf"(?:.*\.)?{re.escape(self.family.lm[0])}\.(?:.*\.)?(?:{alts})"

    def save_pretrained(self, out_dir: str | Path, trainable_only: bool = False) -> None:
        """The released layout again (model + processor); `trainable_only`: the LoRA adapter unmerged in PEFT's
        format under `lora/` (`PeftModel.from_pretrained(<released base>, dir/lora)` loads it) and every other
        trainable tensor (projector, unfrozen tower) under its transformers name in `trainable.safetensors`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.processor.save_pretrained(str(out))
        peft = hasattr(self.model, "peft_config")
        if not trainable_only:
            if peft:
                raise UserError(f"{out}: a model with LoRA adapters saves trainable_only (or merge them first)")
            self.model.save_pretrained(str(out))
            return
        if peft:
            self.model.save_pretrained(str(out / LORA_DIR))
        rest = {self._hf_name(n): p.detach().cpu().contiguous() for n, p in self.named_parameters()
                if p.requires_grad and "lora_" not in n}
        save_file(rest, str(out / TRAINABLE_FILE))
        (out / RELEASED_FILE).write_text(json.dumps({"base": self.source, "family": self.family.name}, indent=2))

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the base weights (peft's `merge_and_unload`): a plain transformers model
        again, which `save_pretrained` writes in the released layout (model/merge.py)."""
        if hasattr(self.model, "peft_config"):
            self.model = self.model.merge_and_unload()

    @staticmethod
    def _hf_name(name: str) -> str:
        """`model.base_model.model.<transformers name>` / `model.<transformers name>` -> the transformers name."""
        return name.removeprefix("model.").removeprefix("base_model.model.")

    # ----- training --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **image_kw: Any) -> ReleasedOutput:
        # Our VLM's keywords that mean nothing here: logits are always returned, spans are counted by the model.
        image_kw.pop("return_logits", None)
        image_kw.pop("image_counts", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self._with_types(input_ids, image_kw))
        loss = None if labels is None else full_logits_loss(out.logits, labels)  # labels shifted there
        return ReleasedOutput(loss, out.logits)

    def _with_types(self, input_ids: torch.Tensor, image_kw: dict) -> dict:
        """transformers' M-RoPE needs `mm_token_type_ids` [B, T] (0 text, 1 image, 2 video) with image inputs;
        derived from input_ids, as its processor does, when the caller did not pass it."""
        if "mm_token_type_ids" not in self.family.extra_inputs or "mm_token_type_ids" in image_kw:
            return image_kw
        cfg = self.model.config
        types = (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()
        return {**image_kw, "mm_token_type_ids": types}

    def _process(self, images: list) -> tuple[dict[str, torch.Tensor], list[ImageSpan]]:
        """ONE conversation's images through the image processor: the model's image inputs and each image's span
        (the processor's own `replace_image_token`, from the same outputs)."""
        if not images:
            return {}, []
        nested = bool(self.family.per_sample_inputs)  # one list per conversation: [1, n_images, ...] outputs
        kwargs = getattr(type(self.processor), "images_kwargs", None)  # e.g. Idefics3: return_row_col_info
        out = self.processor.image_processor(images=[list(images)] if nested else list(images), return_tensors="pt",
                                             **(dict(kwargs) if isinstance(kwargs, dict) else {}))
        texts = [str(self.processor.replace_image_token(out, image_idx=i)) for i in range(len(images))]
        spans = [ImageSpan(t.count(self.image_token), t) for t in texts]
        return {k: v for k, v in out.items() if k in ("pixel_values", *self.family.extra_inputs)}, spans

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """ONE conversation's images -> the model's image inputs (Qwen2-VL: pixel_values [patches, C*T*P*P],
        image_grid_thw [n, 3]; Idefics3: pixel_values [1, n_tiles, 3, H, W], pixel_attention_mask [1, n_tiles, H, W])."""
        return self._process(images)[0]

    def image_tokens(self, images: list) -> list[ImageSpan]:
        """Each image's span: its feature rows as an int, the processor's text as `.text`."""
        return self._process(images)[1]

    def _template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`text` tokenized once, as transformers' chat path does (the tokenizer's special ids unless the text
        already starts with its BOS), with each id's character offsets (dataset/hf_template.py labels by them)."""
        return offsets_tokenizer(self.tokenizer)(text)

    def render(self, sample: Sample, images: list, max_length: int | None = None) -> dict[str, Any]:
        """One training sample: ids and labels from the checkpoint's template, plus its image inputs."""
        inputs, spans = self._process(images)
        ids, labels = render_hf(sample, self._template, self._tokenize, self.image_token, [s.text for s in spans],
                                max_length, span_ids=self._span_ids())
        used = sum(1 for t in ids if t == self.image_token_id)
        kept = next(i for i in range(len(spans) + 1) if sum(spans[:i]) == used)  # truncation drops whole images
        return {"input_ids": ids, "labels": labels, **(inputs if kept == len(spans) else self.image_inputs(images[:kept]))}

    def _span_ids(self) -> frozenset[int]:
        names = (*self.family.notes["span_tokens"], self.image_token)
        return frozenset(self.tokenizer.convert_tokens_to_ids(n) for n in names)

    # ----- answering ---------------------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        tok_eos = self.tokenizer.eos_token_id
        return ids + ([tok_eos] if tok_eos is not None and tok_eos not in ids else [])

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.stop_token_ids[0]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_ids(self, messages: list[dict], n_images: int, image_tokens: list[int] | None = None) -> list[int]:
        """Prompt ids (the checkpoint's template, reply header included) with each image span expanded;
        `image_tokens` is `self.image_tokens(images)` (each span's text rides on it)."""
        spans = list(image_tokens or [])
        if len(spans) != n_images:
            raise ValueError(f"chat: {len(spans)} image span(s) for {n_images} image(s)")
        if not all(isinstance(s, ImageSpan) for s in spans):
            raise ValueError("chat_ids: image_tokens must come from image_tokens(images) (a span is the processor's "
                             "text, not only a count)")
        text = self._template(hf_messages(Sample(id="chat", messages=list(messages))), True)
        return self._tokenize(expand_images(text, self.image_token, [s.text for s in spans]))[0]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 stop_token_ids: list[int] | None = None, **kw: Any) -> list[list[int]]:
        """The model's own generate (greedy unless `do_sample`); new ids per row, cut before the first stop."""
        stops = list(stop_token_ids or self.stop_token_ids)
        kw.setdefault("do_sample", False)
        kw = self._with_types(input_ids, kw)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, eos_token_id=stops,
                                  pad_token_id=self.pad_token_id, **kw)
        new = out[:, input_ids.shape[1]:].tolist()
        return [row[: next((i for i, t in enumerate(row) if t in stops), len(row))] for row in new]

    @staticmethod
    def _place_images(images: list, messages: list[dict]) -> list[dict]:
        messages = [dict(m) for m in messages]
        if images and not any(IMAGE_MARKER in m.get("content", "") for m in messages):
            first = next(i for i, m in enumerate(messages) if m.get("role") == "user")
            messages[first]["content"] = IMAGE_MARKER * len(images) + "\n" + messages[first]["content"]
        return messages

    def chat_batch(self, conversations: list[tuple[list, list[dict]]], **gen_kw: Any) -> list[str]:
        """Several conversations, left-padded into one batch; each reply equals `chat` alone."""
        if not conversations:
            return []
        device = next(self.parameters()).device
        ids_list, inputs = [], []
        for images, messages in conversations:
            image_kw, spans = self._process(list(images))
            ids_list.append(self.chat_ids(self._place_images(images, messages), len(images), spans))
            inputs.append(image_kw)
        width = max(len(x) for x in ids_list)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(x)) + x for x in ids_list], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids_list], device=device)
        image_kw = {k: v.to(device) for k, v in stack_image_inputs(inputs, self.family.per_sample_inputs).items()}
        gen_kw.setdefault("max_new_tokens", 128)
        return [self.decode(new) for new in self.generate(input_ids, mask, **image_kw, **gen_kw)]

    def chat(self, images: list, messages: list[dict], **gen_kw: Any) -> str:
        """Answer the last user turn; images fill the `<image>` markers in order."""
        return self.chat_batch([(list(images), messages)], **gen_kw)[0]


def _set_resolution(image_processor: Any, config: Any, key: str, value: Any) -> None:
    """One resolution key on the image processor; an int for a `{"longest_edge": ...}` setting means that edge.
    A tile side (`max_image_size`) must be the tower's image_size: the model's span length is fixed by it."""
    current = getattr(image_processor, key, None)
    edge = getattr(current, "longest_edge", None) or (current.get("longest_edge") if isinstance(current, dict) else None)
    if isinstance(value, int) and not isinstance(value, bool) and edge is not None:  # a SizeDict or a plain dict
        value = {"longest_edge": value}
    if key == "max_image_size":
        side = getattr(getattr(config, "vision_config", None), "image_size", None)
        if not isinstance(value, dict) or value.get("longest_edge") != side:
            raise UserError(f"max_image_size: {value} is not the vision tower's image_size {side} (each tile is one "
                            "tower input); change size to get more or fewer tiles")
    setattr(image_processor, key, value)
