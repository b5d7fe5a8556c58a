"""A released VLM that does not fit our own VLM (Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, LLaVA-OneVision,
LLaVA-NeXT-Video) behind the same surface.

`ReleasedVLM(family, model, processor)` wraps the transformers model of a wrapper family (model/families.py,
`native=False`) and its processor, both loaded from the checkpoint directory: the model's own vision tower,
projector / merger, anyres packing, frame pooling and M-RoPE (Idefics3 / SmolVLM: SigLIP tower, pixel-shuffle
connector, Llama LM) run unchanged, so its outputs are transformers' by construction. Nothing here names a
family: what differs is read from its entry (model/families.py: prefixes, extra and per-sample inputs, nested
images, resolution keys, image / video tokens) and from its processor (each image's span is
`processor.replace_image_token`, each video's `processor.replace_video_token`: the text the processor itself
puts in place of the placeholder).

Contract (the surface our VLM offers, so train.py / test.py / evaluation use it unchanged where they can):
- `ReleasedVLM.from_pretrained(dir, dtype=None, **resolution)`: `resolution` keys are the family's
  `resolution_keys` (Qwen2-VL: `min_pixels`, `max_pixels`; Idefics3 / SmolVLM: `size`, `max_image_size`,
  `do_image_splitting`, an int N for a `{"longest_edge": ...}` setting meaning `{"longest_edge": N}`), set on the
  image processor; any other key, or a tile side other than the tower's image_size, is a `UserError` naming it.
- `forward(input_ids [B, T], attention_mask [B, T], labels [B, T] | None, **inputs)` with the processor's
  inputs (`pixel_values`, `image_grid_thw`, `pixel_attention_mask`, `image_sizes`, `batch_num_images`,
  `pixel_values_videos`, `video_grid_thw`, ...) -> `ReleasedOutput(loss, logits [B, T, V])`; the loss is
  `core.loss.full_logits_loss` (labels shifted there, the one place), mean fp32 CE over assistant targets.
- `render(sample, images, max_length, videos=None)` -> `{"input_ids", "labels"}` plus the processor's image /
  video inputs (`videos`: one list of PIL frames per video, our frame sampler's): the prompt rendered with the
  checkpoint's own chat template (dataset/hf_chat.py), each image / video span the processor's own text, the
  whole text tokenized once (the tokenizer's special ids, e.g. a Vicuna `<s>`, unless the template already
  wrote its BOS), labels on assistant tokens only, every span token -100. Truncation drops whole turns and
  the images / videos they held; the spans of what stays are asked of the processor again (OneVision: an image
  left alone in its sample takes the single-image anyres path). A family without `video_token` refuses a
  video sample (BadSampleError, one line).
- `image_tokens(images)` / `video_tokens(videos)` -> one `ImageSpan` per item: an int (its feature rows: the
  placeholder tokens in its span) carrying `.text`, the processor's span; `chat_ids` needs them (a bare count
  cannot say where Idefics3's tile markers go). `image_inputs(images)`: ONE conversation's images through the
  image processor (flat; as one nested list for a family with `nested_images`: Idefics3 `[1, n, ...]`,
  OneVision `batch_num_images [1]`). `chat_ids(messages, n_images, image_tokens, video_tokens=None)`,
  `generate(...) -> [[new ids]]` (the model's own generate, greedy by default, cut before the first stop id),
  `chat(images, messages, videos=None)`, `chat_batch([(images, messages[, videos]), ...])`, `decode`,
  `stop_token_ids`, `pad_token_id`, `save_pretrained(dir)` (model + processor, the released layout again),
  `merge_lora()` (adapters folded in; `python -m qwenvl_lab.model.merge` then writes the released layout).
- `towers`: the family's `notes["towers"]` module (LLaVA: the vision tower), else its vision and projector
  modules as one list.
- `tokens_per_image` is None: a span's length depends on the image's size.
- Serving: the family's `serving` line says how (through `generate`, not our engine).
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
from ..dataset.hf_chat import SpanRule, expand_spans, hf_messages, render_hf, stack_image_inputs
from ..dataset.hf_template import offsets_tokenizer
from ..dataset.sample import IMAGE_MARKER, VIDEO_MARKER, BadSampleError, Sample
from .families import Family, family_of

LORA_DIR = "lora"
TRAINABLE_FILE = "trainable.safetensors"
RELEASED_FILE = "released.json"


class ImageSpan(int):
    """One image's (or video's) feature rows (the placeholder tokens of its span), carrying `text`: the
    processor's span for it."""

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
        self.video_token = family.notes.get("video_token")  # None: the family takes no videos here
        if processor is None:  # a skeleton (the plan, export): no tokenizer to ask
            self.image_token_id = self.video_token_id = None
            return
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = None if self.video_token is None else self.tokenizer.convert_tokens_to_ids(self.video_token)
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
    def towers(self) -> nn.Module:
        """The family's `towers` module (LLaVA: the vision tower), else its vision modules and projector (the
        family's prefixes) as one list; the weights stay in `model`."""
        hf = self._hf()
        if self.family.notes.get("towers"):
            return hf.get_submodule(self.family.notes["towers"])
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
            if hasattr(self.model, "peft_config"):  # an older peft leaves it on the unwrapped model
                del self.model.peft_config

    @staticmethod
    def _hf_name(name: str) -> str:
        """`model.base_model.model.<transformers name>` / `model.<transformers name>` -> the transformers name."""
        return name.removeprefix("model.").removeprefix("base_model.model.")

    # ----- training --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_logits: bool | None = None,
                image_counts: Any = None, **image_kw: Any) -> ReleasedOutput:
        """`return_logits` / `image_counts` are our VLM's keywords (evaluation passes them): logits are always
        computed here, and the processor's inputs already say which images belong to which sample."""
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

    def _media(self, images: list, videos: list = ()) -> tuple[list[ImageSpan], list[ImageSpan], dict[str, torch.Tensor]]:
        """ONE conversation's images and videos (each video a list of frames) through the processor's image /
        video processor: each item's span (the processor's own `replace_image_token` / `replace_video_token`,
        from the same outputs) and the model's inputs (pixel_values, pixel_values_videos and the family's extra
        inputs). A family with `nested_images` gets the conversation's images as one nested list."""
        images, videos = list(images or []), list(videos or [])
        if videos and self.video_token is None:
            raise BadSampleError(f"videos are not supported for the released family {self.family.name}",
                                 kind="bad_video")
        inputs: dict[str, torch.Tensor] = {}
        image_spans: list[ImageSpan] = []
        video_spans: list[ImageSpan] = []
        keep = ("pixel_values", "pixel_values_videos", *self.family.extra_inputs)
        if images:
            nested = self.family.nested_images  # [1, n_images, ...] outputs / batch_num_images [1]
            out = self.processor.image_processor(images=[images] if nested else images,
                                                 **self._defaults("images_kwargs"))
            texts = [str(self.processor.replace_image_token(out, image_idx=i)) for i in range(len(images))]
            image_spans = [ImageSpan(t.count(self.image_token), t) for t in texts]
            inputs.update({k: v for k, v in out.items() if k in keep})
        if videos:
            out = self.processor.video_processor(videos=videos, **self._defaults("videos_kwargs"))
            texts = [str(self.processor.replace_video_token(out, video_idx=i)) for i in range(len(videos))]
            video_spans = [ImageSpan(t.count(self.video_token), t) for t in texts]
            inputs.update({k: v for k, v in out.items() if k in keep})
        return image_spans, video_spans, inputs

    def _defaults(self, kind: str) -> dict:
        """The processor class's own defaults for its image / video processor call (Idefics3:
        return_row_col_info), returning tensors."""
        kwargs = getattr(type(self.processor), kind, None)
        return {**(dict(kwargs) if isinstance(kwargs, dict) else {}), "return_tensors": "pt"}

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """ONE conversation's images -> the model's image inputs (Qwen2-VL: pixel_values [patches, C*T*P*P],
        image_grid_thw [n, 3]; Idefics3: pixel_values [1, n_tiles, 3, H, W], pixel_attention_mask [1, n_tiles, H, W];
        OneVision: pixel_values [n, crops, C, H, W], image_sizes [n, 2], batch_num_images [1])."""
        return self._media(images)[2]

    def image_tokens(self, images: list) -> list[ImageSpan]:
        """Each image's span (ONE conversation's images): its feature rows as an int, the processor's text as
        `.text`."""
        return self._media(images)[0]

    def video_tokens(self, videos: list) -> list[ImageSpan]:
        """Each video's (a list of frames) span, as `image_tokens`."""
        return self._media([], videos)[1]

    def _template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`text` tokenized once, as transformers' chat path does (the tokenizer's special ids unless the text
        already starts with its BOS), with each id's character offsets (dataset/hf_template.py labels by them)."""
        return offsets_tokenizer(self.tokenizer)(text)

    def render(self, sample: Sample, images: list, max_length: int | None = None,
               videos: list | None = None) -> dict[str, Any]:
        """One training sample: ids and labels from the checkpoint's template, plus its image / video inputs
        (`videos`: one list of frames per video of the sample, from our frame sampler)."""
        images, videos = list(images), list(videos or [])
        if (sample.videos or videos) and self.video_token is None:
            raise BadSampleError(f"{sample.where}: videos are not supported for the released family "
                                 f"{self.family.name}", kind="bad_video")
        full = self._media(images, videos)

        def spans(part: str, n: int) -> list[str]:
            """The first n items' spans; fewer than all (truncation) are asked of the processor again."""
            if part == "image":
                got = full[0] if n == len(images) else self._media(images[:n])[0]
            else:
                got = full[1] if n == len(videos) else self._media([], videos[:n])[1]
            return [s.text for s in got]

        rules = [SpanRule(self.image_token, "image", lambda n: spans("image", n))]
        if self.video_token is not None:
            rules.append(SpanRule(self.video_token, "video", lambda n: spans("video", n)))
        ids, labels, kept = render_hf(sample, self._template, self._tokenize, rules, max_length,
                                      span_ids=self._span_ids())
        n_img, n_vid = kept["image"], kept.get("video", 0)
        # truncation drops whole turns: the inputs of the images / videos those turns held go with them
        inputs = full[2] if (n_img, n_vid) == (len(images), len(videos)) else self._media(images[:n_img],
                                                                                            videos[:n_vid])[2]
        return {"input_ids": ids, "labels": labels, **inputs}

    def _span_ids(self) -> frozenset[int]:
        names = (*self.family.notes["span_tokens"], self.image_token, *([self.video_token] if self.video_token else []))
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

    def chat_ids(self, messages: list[dict], n_images: int, image_tokens: list[int] | None = None,
                 video_tokens: list[int] | None = None) -> list[int]:
        """Prompt ids (the checkpoint's template, reply header included) with each image / video span expanded;
        `image_tokens` is `self.image_tokens(images)`, `video_tokens` `self.video_tokens(videos)` (each span's
        text rides on it)."""
        spans, vspans = list(image_tokens or []), list(video_tokens or [])
        if len(spans) != n_images:
            raise ValueError(f"chat: {len(spans)} image span(s) for {n_images} image(s)")
        if not all(isinstance(s, ImageSpan) for s in spans + vspans):
            raise ValueError("chat_ids: image_tokens / video_tokens must come from image_tokens(images) / "
                             "video_tokens(videos) (a span is the processor's text, not only a count)")
        text = self._template(hf_messages(Sample(id="chat", messages=list(messages))), True)
        expand = {self.image_token: [s.text for s in spans]}
        if self.video_token is not None:
            expand[self.video_token] = [s.text for s in vspans]
        elif vspans:
            raise ValueError(f"chat_ids: the released family {self.family.name} takes no videos")
        return self._tokenize(expand_spans(text, expand))[0]

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
    def _place_media(images: list, messages: list[dict], videos: list = ()) -> list[dict]:
        """Messages without markers get them at the start of the first user turn (videos, then images)."""
        messages = [dict(m) for m in messages]
        first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), 0)
        for items, marker in ((images, IMAGE_MARKER), (videos, VIDEO_MARKER)):
            if items and not any(marker in m.get("content", "") for m in messages):
                messages[first]["content"] = marker * len(items) + "\n" + messages[first]["content"]
        return messages

    def chat_batch(self, conversations: list[tuple], **gen_kw: Any) -> list[str]:
        """Several conversations `(images, messages)` or `(images, messages, videos)` (each video a list of
        frames), left-padded into one batch; each reply equals `chat` alone."""
        if not conversations:
            return []
        device = next(self.parameters()).device
        ids_list, parts = [], []
        for conv in conversations:
            images, messages = list(conv[0]), conv[1]
            videos = list(conv[2]) if len(conv) > 2 and conv[2] else []
            image_spans, video_spans, inputs = self._media(images, videos)
            ids_list.append(self.chat_ids(self._place_media(images, messages, videos), len(images), image_spans,
                                          video_spans))
            parts.append(inputs)
        width = max(len(x) for x in ids_list)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(x)) + x for x in ids_list], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids_list], device=device)
        image_kw = {k: v.to(device) for k, v in stack_image_inputs(parts, self.family.per_sample_inputs).items()}
        gen_kw.setdefault("max_new_tokens", 128)
        return [self.decode(new) for new in self.generate(input_ids, mask, **image_kw, **gen_kw)]

    def chat(self, images: list, messages: list[dict], videos: list | None = None, **gen_kw: Any) -> str:
        """Answer the last user turn; images fill the `<image>` markers in order, videos (lists of frames)
        the `<video>` markers."""
        return self.chat_batch([(list(images), messages, list(videos or []))], **gen_kw)[0]


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
