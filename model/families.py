"""Released VLM families: one entry each, what the project needs to load, feed and train a released checkpoint.

`FAMILIES: dict[str, Family]` (a plain registry, keyed by the family name) and `family_of(path_or_config) ->
Family | None` (by the checkpoint's config.json `model_type`; where several entries share one, as LLaVA-1.5 and
llava-interleave share "llava", by the first `template_marker` found in the directory's chat template, the entry
without a marker otherwise). Adding a family is one entry here plus its
parity test (tests/test_families.py).

A `Family` says:
- `model_types`: the config.json `model_type` values it covers;
- `hf_class`: the transformers class that loads it (with `AutoProcessor` for its processor);
- `native`: True when it imports into our own VLM (model/llava.py: LLaVA-1.5, llava-interleave, LLaVA-NeXT),
  False when it runs through the wrapper (model/released.py) behind the same surface as our VLM;
- `span`: how one image (or video) becomes its token span, in words (the processor is the reference; tests compare ids);
- `extra_inputs`: the processor outputs the model needs besides input_ids / attention_mask / pixel_values
  (e.g. `image_sizes`, `image_grid_thw`, `pixel_values_videos`);
- `vision`, `projector`, `lm`: the module-name prefixes of each part inside the transformers model (stages,
  freezing, default LoRA targets and the separate learning rates read them);
- `resolution_keys`: the image processor settings a recipe may set (Qwen2-VL's `min_pixels` / `max_pixels`;
  Idefics3's `size` / `max_image_size` (`{"longest_edge": N}`; an int N means that) and `do_image_splitting`);
- `per_sample_inputs`: image inputs with a leading per-conversation axis (Idefics3 / SmolVLM: `pixel_values`
  [B, max images, 3, H, W], `pixel_attention_mask` [B, max images, H, W]); a conversation's images go to the
  image processor as ONE nested list, and a batch pads this axis with all-zero images (the model drops them).
  Empty: every image input is flat, rows concatenated in sample order (Qwen2-VL, LLaVA-OneVision);
- `nested_images`: a conversation's images go to the image processor as ONE nested list (True with
  `per_sample_inputs`; LLaVA-OneVision too, whose span and crops depend on how many images a sample holds:
  one image -> anyres, several -> base views only), while its inputs stay flat;
- `video`: whether it takes videos (`pixel_values_videos`);
- `template_marker`: a string the checkpoint's own chat template holds (tokenizer_config.json `chat_template`,
  chat_template.jinja / chat_template.json), telling apart families that share a `model_type`;
- `serving`: "engine" (our serving engine drives it), "generate" (the server decodes with the model's own
  generate) or a one-line reason it is refused.
- `notes` (wrapper families): `image_token` / `video_token` (the token the template writes per image / video and
  the processor replaces by its span, `processor.replace_image_token` / `replace_video_token`; no `video_token`:
  video samples are refused), `span_tokens` (marker tokens the TEMPLATE writes around those tokens; -100 like
  the span), `lora_targets` (its LM's linear layers, the default targets), `towers` (the module
  `ReleasedVLM.towers` returns; default: every vision and projector module of the entry, as one list).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    hf_class: str
    native: bool
    span: str
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    lm: tuple[str, ...]
    extra_inputs: tuple[str, ...] = ()
    resolution_keys: tuple[str, ...] = ()
    video: bool = False
    serving: str = "engine"
    notes: dict = field(default_factory=dict)
    template_marker: str | None = None
    per_sample_inputs: tuple[str, ...] = ()
    nested_images: bool = False


_LLAVA_PARTS = dict(vision=("model.vision_tower",), projector=("model.multi_modal_projector",),
                    lm=("model.language_model", "lm_head"))
_LLAVA_SPAN = ("each <image> -> N x image_token_index, nothing around it (LlavaProcessor); N = the tower's patches "
               "(+ CLS with vision_feature_select_strategy 'full')")

FAMILIES: dict[str, Family] = {
    # Native families (model/llava.py imports them into our VLM); the wrapper's entries follow.
    "llava": Family(name="llava", model_types=("llava",), hf_class="LlavaForConditionalGeneration", native=True,
                    span=_LLAVA_SPAN, **_LLAVA_PARTS),
    "llava-interleave": Family(
        name="llava-interleave", model_types=("llava",), hf_class="LlavaForConditionalGeneration", native=True,
        span=_LLAVA_SPAN + "; several images anywhere in the conversation", template_marker="<|im_start|>",
        notes={"told_apart": "model_type 'llava' with a ChatML chat template (Qwen LM)"}, **_LLAVA_PARTS),
    "llava_next": Family(
        name="llava_next", model_types=("llava_next",), hf_class="LlavaNextForConditionalGeneration", native=True,
        span="anyres: base image + the tiles of its best pinpoint, unpadded, a learned newline after each row "
             "(LlavaNextProcessor's count)", extra_inputs=("image_sizes",),
        vision=("model.vision_tower",), projector=("model.multi_modal_projector", "model.image_newline"),
        lm=("model.language_model", "lm_head")),
    # Qwen-VL-Chat: imported into our VLM (model/qwenvl_chat.py; tests/test_qwenvl_chat.py is its parity test).
    # Its config.json says model_type "qwen", as a text-only Qwen-1 LM does: it is recognised by the `visual`
    # dict beside it (model.paths.is_qwenvl_chat_dir), so `model_types` stays empty here.
    "qwen_vl_chat": Family(
        name="qwen_vl_chat", model_types=(), hf_class="", native=True,
        span="Picture i: <img> + n_queries (256) x <imgpad> + </img>\n in the user text (Qwen-VL's tokenizer: "
             "151857 / 151859 / 151858); every row between <img> and </img> is an image feature",
        vision=("towers",), projector=("projector",), lm=("lm",),
        notes={"detect": "config.json model_type 'qwen' with a 'visual' dict", "remote_code": "not needed"},
    ),
}


def family_of(source: str | Path | dict) -> Family | None:
    """The family of a checkpoint directory (its config.json) or of a config dict, by `model_type`."""
    template = ""
    if isinstance(source, dict):
        cfg = source
    else:
        path = Path(source) / "config.json"
        if not path.is_file():
            return None
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable or not JSON: no family (the caller says what it expected)
            return None
        template = chat_template_text(Path(source)) or ""
    if not isinstance(cfg, dict):
        return None
    model_type = cfg.get("model_type")
    matches = [f for f in FAMILIES.values() if model_type in f.model_types]
    marked = [f for f in matches if f.template_marker is not None and f.template_marker in template]
    unmarked = [f for f in matches if f.template_marker is None]
    return (marked or unmarked or [None])[0]


def chat_template_text(path: Path) -> str | None:
    """The checkpoint's own chat template in any of the released layouts: chat_template.jinja,
    chat_template.json's "chat_template", else tokenizer_config.json's `chat_template` (a string)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            try:
                text = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(text, str):
                return text
    return None


# ----- wrapper families (model/released.py): run through the transformers model itself --------------------
_QWEN_VL_SPAN = ("'<|vision_start|><|image_pad|><|vision_end|>' with <|image_pad|> repeated "
                 "grid_t * grid_h * grid_w // merge_size**2 times (image_grid_thw from its image processor); a video "
                 "likewise with <|video_pad|> and video_grid_thw (frames in pairs: temporal_patch_size 2)")
_QWEN_VL_SERVING = ("generate: M-RoPE positions (3 rows per token, from image_grid_thw) are not what our engine "
                    "computes, so the server decodes through the model's own generate")

_QWEN_VL_PARTS = dict(
    native=False, vision=("model.visual.patch_embed", "model.visual.blocks"), projector=("model.visual.merger",),
    lm=("model.language_model", "lm_head"), extra_inputs=("image_grid_thw", "video_grid_thw", "mm_token_type_ids"),
    resolution_keys=("min_pixels", "max_pixels"), video=True, serving=_QWEN_VL_SERVING,
    notes={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
           "span_tokens": ("<|vision_start|>", "<|vision_end|>"),
           "lora_targets": "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"},
)
FAMILIES["qwen2_vl"] = Family(name="qwen2_vl", model_types=("qwen2_vl",), hf_class="Qwen2VLForConditionalGeneration",
                              span=_QWEN_VL_SPAN, **_QWEN_VL_PARTS)
FAMILIES["qwen2_5_vl"] = Family(
    name="qwen2_5_vl", model_types=("qwen2_5_vl",), hf_class="Qwen2_5_VLForConditionalGeneration",
    span=_QWEN_VL_SPAN + "; window attention in the tower does not change the count", **_QWEN_VL_PARTS)

# Idefics3 / SmolVLM: a SigLIP tower, a pixel-shuffle connector and a Llama-style LM (SmolLM for SmolVLM).
_TILE_SPAN = (
    "the processor replaces each <image> by its span: an image larger than max_image_size (after resizing its "
    "longest edge to size) is split into rows x cols tiles of max_image_size, each '<fake_token_around_image>"
    "<row_i_col_j>' + image_seq_len x <image>, a newline after each row, then '\\n<fake_token_around_image>"
    "<global-img>' + image_seq_len x <image> + '<fake_token_around_image>' for the downscaled global image; an "
    "image that needs no split (or do_image_splitting=False) is only the global part. image_seq_len = "
    "(image_size / patch_size)**2 / scale_factor**2 feature rows per tile")
_TILE_SERVING = ("generate: the wrapper has no KV-cache step for our engine, so the server decodes through the "
                 "model's own generate")
_TILE_PARTS = dict(vision=("model.vision_model",), projector=("model.connector",), lm=("model.text_model", "lm_head"))
_TILE_INPUTS = dict(extra_inputs=("pixel_attention_mask",), per_sample_inputs=("pixel_values", "pixel_attention_mask"),
                    nested_images=True, resolution_keys=("size", "max_image_size", "do_image_splitting"),
                    serving=_TILE_SERVING)
_TILE_NOTES = {"image_token": "<image>", "span_tokens": (),
               "lora_targets": "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"}

FAMILIES["idefics3"] = Family(
    name="idefics3", model_types=("idefics3",), hf_class="Idefics3ForConditionalGeneration", native=False,
    span=_TILE_SPAN, notes=dict(_TILE_NOTES), **_TILE_PARTS, **_TILE_INPUTS)
FAMILIES["smolvlm"] = Family(
    name="smolvlm", model_types=("smolvlm",), hf_class="SmolVLMForConditionalGeneration", native=False,
    span=_TILE_SPAN + " (the same rule as Idefics3; its processor needs the num2words package)",
    notes=dict(_TILE_NOTES), **_TILE_PARTS, **_TILE_INPUTS)

# LLaVA-OneVision and LLaVA-NeXT-Video run through the wrapper too: OneVision's anyres_max_9 (its own unpad, then a
# bilinear downscale of an image's grid when it holds more than 9 crops' worth of tokens), its base-view-only
# rule for several images per sample and NeXT-Video's frame pooling are transformers' code, so running that code
# gives exact parity; a native import would re-implement each of them (model/anyres.py has LLaVA-NeXT's packing
# only).
_LLAVA_WRAPPED_SERVING = ("generate: answered through the model's own generate (ReleasedVLM.chat / chat_batch); "
                          "our engine drives only a native VLM's image rows, not this family's pixel inputs")
_LLAVA_LORA = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"

FAMILIES["llava_onevision"] = Family(
    name="llava_onevision", model_types=("llava_onevision",), hf_class="LlavaOnevisionForConditionalGeneration",
    native=False,
    span=("anyres_max_9: one image in a sample -> base view + the unpadded tiles of its best pinpoint, a newline "
          "after each row, the grid bilinearly downscaled when it exceeds 9 crops (x1.1); several images in a "
          "sample -> each its base view (padded square) + one newline; a video -> frames x ceil(p/2)^2 pooled "
          "rows + one newline (LlavaOnevisionProcessor's replace_image_token / replace_video_token: each "
          "<image> / <video> becomes that many)"),
    vision=("model.vision_tower",), projector=("model.multi_modal_projector", "model.image_newline"),
    lm=("model.language_model", "lm_head"), extra_inputs=("image_sizes", "batch_num_images"),
    video=True, serving=_LLAVA_WRAPPED_SERVING, nested_images=True,
    notes={"image_token": "<image>", "video_token": "<video>", "span_tokens": (), "lora_targets": _LLAVA_LORA,
           "towers": "model.vision_tower"},
)
FAMILIES["llava_next_video"] = Family(
    name="llava_next_video", model_types=("llava_next_video",), hf_class="LlavaNextVideoForConditionalGeneration",
    native=False,
    span=("images as LLaVA-NeXT (anyres base + unpadded tiles, a newline per row); a video -> frames x "
          "(p/stride)^2 rows after its spatial pooling, no newline (LlavaNextVideoProcessor's count)"),
    vision=("model.vision_tower",),
    projector=("model.multi_modal_projector", "model.image_newline", "model.vision_resampler"),
    lm=("model.language_model", "lm_head"), extra_inputs=("image_sizes",),
    video=True, serving=_LLAVA_WRAPPED_SERVING,
    notes={"image_token": "<image>", "video_token": "<video>", "span_tokens": (), "lora_targets": _LLAVA_LORA,
           "towers": "model.vision_tower"},
)
