"""Export a trained VLM to a standard format.

    python -m qwenvl_lab.model.export --src RUN_OR_MODEL_DIR --dst DIR --format llava-hf

`llava-hf` writes transformers' `LlavaForConditionalGeneration` layout (config.json, safetensors), the
tokenizer with the LM's chat template (ChatML, Llama-3, Mistral, Gemma, Phi-3: `export_chat_template`), and the image-processor / processor files, so
`AutoModelForImageTextToText.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)` load it and give
our model's logits. Requirements, checked with a clear error: one transformers CLIP or SigLIP tower, an
`mlp2x_gelu` projector without token reduction, and a Qwen2/Qwen3 LM (a Qwen-1 LM is converted on the way
with `qwen.convert`) or a generic transformers LM. LoRA adapters are merged first.

Generation stops where ours does: `generation_config.json` and `text_config` carry the end ids read from
the VLM (`vlm.stop_token_ids`, end of turn first, plus the end-of-text / padding id `vlm.pad_token_id`), and
`pad_token_id`; `image_seq_length` is the model's real tokens per image, so transformers' `generate` and
vLLM serve the export without extra settings.

An anyres model (`image_grid_pinpoints` set) is written as transformers' `LlavaNextForConditionalGeneration`
(config.json model_type "llava_next": the pinpoints, the learned `image_newline`) with a
`LlavaNextProcessor`; transformers tiles every image of a sample and always closes rows with the newline,
so the model must have `multi_image="anyres"`, `image_newline=True` and no `anyres_max` (else a clear
error). `VLM.from_pretrained` imports the export back (model/llava.py), the same logits.
A native-resolution model (`max_pixels`) or a NaFlex one (an `hf_siglip2` tower) has no Llava layout: refused
(`export` answers one line naming the key), like an anyres setting transformers lacks.

`peft-adapter` (`export_peft_adapter`) writes the unmerged LoRA adapters of a model imported from a Llava
directory, plus its trained projector as peft's `modules_to_save`, in PEFT's own format for the released base:
`PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(BASE), DIR)` gives our logits (our
Qwen LM's fused `c_attn` adapter is split exactly into q/k/v; Qwen-1 names become Qwen2's).

A run of a released wrapper family (Qwen2-VL, Qwen2.5-VL: model/released.py) exports `peft-adapter` only
(model/released_export.py: its LoRA plus the trained merger as `modules_to_save`, for its released base);
`llava-hf` is refused in one line (its own released layout is what model/merge.py writes).

Image spans: our template writes `image_start + N x placeholder + image_end`; the exported chat template
writes `image_start + placeholder + image_end` for each image and the Llava processor expands the single
placeholder to N, so the same conversation gives the same ids.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    SiglipImageProcessor,
)

from ..core.cli import run_cli, writable_dir
from ..core.errors import UserError
from ..dataset.chat_templates import ChatTemplate
from ..qwen.convert import convert, convert_tokenizer
from ..visual.processor import RESAMPLE
from .families import FAMILIES, family_of
from .model import load_vlm
from .paths import resolve_model_dir
from .released import RELEASED_FILE, ReleasedVLM
from .released_export import export_released_peft

FORMATS = ("llava-hf", "peft-adapter")
TOWER_TYPES = {"hf_clip": "clip", "hf_siglip": "siglip"}

def _lit(text: str) -> str:
    """A Jinja string literal (JSON's escaping is Jinja's)."""
    return json.dumps(text)


def export_chat_template(template: ChatTemplate, image: str) -> str:
    """A Jinja chat template that writes what `dataset.rendering.render` writes for `template`, with `image`
    (image start + placeholder + image end, as text) for each image content item; transformers' Llava
    processor then expands the placeholder to the tokens per image. Content may be a string or a list of
    {"type": "image"} / {"type": "text", "text": ...} items."""
    h, s = template.header, template.suffix
    content = ("{% macro content(c) %}{% if c is string %}{{ c }}{% else %}{% for item in c %}"
               "{% if item['type'] == 'image' %}{{ " + _lit(image) + " }}{% elif item['type'] == 'text' %}"
               "{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}")
    if template.folds_system:  # the system text goes in front of the first user turn
        before, after = template.system.split("{content}")[0].split("{system}")
        system = "{% set ns.sys = " + _lit(before) + " + content(m['content']) + " + _lit(after) + " %}"
    else:
        system = "{{ " + _lit(h["system"]) + " + content(m['content']) + " + _lit(s["system"]) + " }}"
    parts = [content, "{% set ns = namespace(sys='') %}"]
    if template.bos:
        parts.append("{{ " + _lit(template.bos) + " }}")
    parts += [
        "{% for m in messages %}",
        "{% if m['role'] == 'system' %}" + system,
        "{% elif m['role'] == 'user' %}{{ " + _lit(h["user"]) + " + ns.sys + content(m['content']) + "
        + _lit(s["user"]) + " }}{% set ns.sys = '' %}",
        "{% elif m['role'] == 'assistant' %}{{ " + _lit(h["assistant"]) + " + content(m['content']) + "
        + _lit(s["assistant"]) + " }}",
        "{% endif %}{% endfor %}",
        "{% if add_generation_prompt %}{{ " + _lit(h["assistant"]) + " }}",
    ]
    if template.closing:
        parts.append("{% else %}{{ " + _lit(template.closing) + " }}")
    parts.append("{% endif %}")
    return "".join(parts)


def _lm_as_transformers(vlm, tmp: Path):
    """The VLM's LM as a transformers causal LM (through its native on-disk format)."""
    lm = vlm.lm
    if vlm.config.lm_backend != "qwen":
        return lm
    src = tmp / "lm_native"
    lm.save_pretrained(str(src))
    if lm.config.arch == "qwen1":
        if vlm.tokenizer is not None:
            vlm.tokenizer.save_pretrained(src)  # the converter turns qwen.tiktoken into tokenizer.json
        src_converted = tmp / "lm_qwen2"
        convert(src, src_converted)
        src = src_converted
    return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)


def _check_resolution(res) -> None:
    """Resolution settings transformers' Llava / LLaVA-NeXT cannot express, named by their config key."""
    if res.mode == "native":
        raise ValueError("llava-hf export: native resolution (model.max_pixels / min_pixels, Qwen2-VL's "
                         "smart_resize and patch merge) has no Llava or LLaVA-NeXT layout; unset max_pixels "
                         "(retrain) or keep the model in this format")
    if res.mode == "naflex":
        raise ValueError("llava-hf export: NaFlex resolution (the hf_siglip2 tower's max_num_patches) has no "
                         "Llava or LLaVA-NeXT layout; keep the model in this format")
    if res.mode == "anyres" and (res.multi_image != "anyres" or not res.image_newline or res.anyres_max):
        raise ValueError(f"llava-hf export of an anyres model (LLaVA-NeXT) needs multi_image=anyres, "
                         f"image_newline=true and anyres_max=null (transformers' rules); got "
                         f"multi_image={res.multi_image!r}, image_newline={res.image_newline}, "
                         f"anyres_max={res.anyres_max}")
    if res.mode not in ("fixed", "anyres"):
        raise ValueError(f"llava-hf export: resolution mode {res.mode!r} has no Llava layout")


def _check_exportable(vlm):
    """(backend, tower) when the model fits the Llava layout; a clear error otherwise."""
    cfg = vlm.config
    _check_resolution(vlm.resolution)  # first: a native model's projector and tower fail for that reason
    if len(cfg.towers) != 1:
        raise ValueError(f"llava-hf export needs exactly one vision tower, the model has {len(cfg.towers)}")
    tower = vlm.towers
    backend = getattr(tower, "backend", None)
    if backend not in TOWER_TYPES:
        raise ValueError(f"llava-hf export needs a transformers CLIP or SigLIP tower; this one is {backend!r}")
    if cfg.projector != "mlp2x_gelu" or cfg.reduce is not None:
        raise ValueError(
            f"llava-hf export needs projector=mlp2x_gelu without token reduction; got projector="
            f"{cfg.projector!r} reduce={cfg.reduce!r}"
        )
    if tower.select == "drop_first" or getattr(tower, "last_hidden_state", False):
        raise ValueError("llava-hf export: this tower feeds the BigBro repo's features (select=drop_first / "
                         "last_hidden_state), which Llava's feature selection cannot express")
    return backend, tower


def _llava_model(vlm, vision, lm, text_config: dict, strategy: str):
    """transformers' Llava (fixed) or LLaVA-NeXT (anyres) model holding our modules, built on meta."""
    tower = vlm.towers
    common = dict(
        vision_config=vision.config.to_dict(), text_config=text_config,
        vision_feature_layer=int(tower.feature_layer), vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
        image_seq_length=int(vlm.tokens_per_image),
    )
    if vlm.resolution.mode == "anyres":
        pins = [[int(h), int(w)] for h, w in vlm.resolution.pinpoints]
        config = LlavaNextConfig(image_token_index=int(vlm.image_token_id), image_grid_pinpoints=pins, **common)
        cls = LlavaNextForConditionalGeneration
    else:
        config, cls = LlavaConfig(image_token_id=int(vlm.image_token_id), **common), LlavaForConditionalGeneration
    with torch.device("meta"):
        llava = cls(config)
    llava.model.vision_tower = vision
    llava.model.language_model = lm.model
    llava.lm_head = lm.lm_head
    proj = vlm.projector.mlp
    mm = llava.model.multi_modal_projector
    mm.linear_1, mm.linear_2 = proj[0], proj[2]
    if vlm.resolution.mode == "anyres":
        llava.model.image_newline = torch.nn.Parameter(vlm.image_newline.detach().float().clone())
    return llava


def export_llava_hf(vlm, dst: str | Path) -> Path:
    backend, tower = _check_exportable(vlm)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="vlm_export_"))
    try:
        lm = _lm_as_transformers(vlm, tmp)
        vision = tower.model  # transformers CLIPVisionModel / SiglipVisionModel
        has_cls = tower.has_cls
        if tower.select == "patch":
            strategy = "default" if has_cls else "full"
        else:
            strategy = "full"
        # What `VLM.chat` stops at: end of turn first, end of text last (ChatFormat.stop_token_ids).
        eos, pad = [int(t) for t in vlm.stop_token_ids], int(vlm.pad_token_id)
        text_config = lm.config.to_dict()
        text_config.update(eos_token_id=eos, pad_token_id=pad)  # a converted LM's own may be None
        # vLLM picks the language model's class by this name (a scratch transformers LM has none).
        text_config["architectures"] = text_config.get("architectures") or [type(lm).__name__]
        llava = _llava_model(vlm, vision, lm, text_config, strategy)
        llava.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
        llava.save_pretrained(str(dst))

        # Tokenizer (with the LM's chat template) and the image processor.
        tok = _hf_tokenizer(vlm, tmp)
        fmt = vlm.chat_format
        placeholder = tok.convert_ids_to_tokens(vlm.image_token_id)
        start, end = ("" if i is None else tok.convert_ids_to_tokens(i) for i in (fmt.image_start_id,
                                                                                  fmt.image_end_id))
        # The checkpoint's own template (a LLaVA-1.5 import) is written back as it is; ours as Jinja.
        tok.chat_template = fmt.jinja or export_chat_template(fmt.template, start + placeholder + end)
        pp = tower.preprocess_config()
        image_processor = _image_processor(backend, pp, vlm.resolution)
        n_patches = tower.grid[0] * tower.grid[1]
        patch = pp["size"] // tower.grid[0]
        processor_cls = LlavaNextProcessor if vlm.resolution.mode == "anyres" else LlavaProcessor
        processor = processor_cls(
            image_processor=image_processor, tokenizer=tok, patch_size=patch,
            vision_feature_select_strategy=strategy, chat_template=tok.chat_template,
            image_token=placeholder, num_additional_image_tokens=int(has_cls),
        )
        assert n_patches == (pp["size"] // patch) ** 2
        processor.save_pretrained(str(dst))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


# Our Qwen LM's module names (Qwen-1's, for every generation) -> transformers' Qwen2 names; c_attn is q, k, v.
_QWEN_TO_HF = {"attn.c_proj": "self_attn.o_proj", "mlp.w1": "mlp.up_proj", "mlp.w2": "mlp.gate_proj",
               "mlp.c_proj": "mlp.down_proj"}
_LORA_RE = re.compile(r"^(?:base_model\.model\.)?(?:model|transformer)\.(?:layers|h)\.(\d+)\.(.+)\.(lora_[AB])\.default\.weight$")


def _released_lora(vlm) -> dict[str, torch.Tensor]:
    """Our LoRA tensors under the released Llava's module names, in peft's in-memory form
    (`base_model.model.model.language_model.layers.{i}.{module}.lora_A.default.weight`). Our Qwen LM's fused
    c_attn adapter splits exactly into q/k/v: one shared A, B's rows cut at the q / k / v widths."""
    qwen = vlm.config.lm_backend == "qwen"
    cfg = vlm.lm.get_base_model().config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    widths = [cfg.num_attention_heads * head] + [(getattr(cfg, "num_key_value_heads", None)
                                                 or cfg.num_attention_heads) * head] * 2
    out = {}
    for name, t in vlm.lm.named_parameters():
        if "lora_" not in name:
            continue
        m = _LORA_RE.match(name)
        if m is None:
            raise ValueError(f"PEFT adapter export: LoRA tensor {name!r} is not in a decoder layer")
        layer, module, ab = m.groups()
        prefix = f"base_model.model.model.language_model.layers.{layer}."
        t = t.detach().float().clone()
        if qwen and module == "attn.c_attn":
            parts = [t] * 3 if ab == "lora_A" else list(t.split(widths, dim=0))
            for proj, part in zip("qkv", parts):
                out[f"{prefix}self_attn.{proj}_proj.{ab}.default.weight"] = part.contiguous()
            continue
        module = _QWEN_TO_HF.get(module, module) if qwen else module
        out[f"{prefix}{module}.{ab}.default.weight"] = t
    return out


def export_peft_adapter(vlm, dst: str | Path, base: str | Path | None = None) -> Path:
    """The unmerged LoRA adapters (and the trained projector, as peft's `modules_to_save`) in PEFT's format
    for the released `LlavaForConditionalGeneration` at `base` (default: the import's `init_from`):
    adapter_config.json + adapter_model.safetensors, written by peft itself from a peft model built on the
    meta device (no base weights read), so `PeftModel.from_pretrained(released_base, dst)` loads it."""
    from peft import LoraConfig, get_peft_model  # peft only where adapters are

    base = base or vlm.config.init_from
    if base is None or not hasattr(vlm.lm, "peft_config"):
        raise ValueError("PEFT adapter export needs a model imported from a Llava directory (init_from) "
                         "with LoRA adapters (stage=sft, lora.r > 0)")
    lora = vlm.lm.peft_config["default"]
    if vlm.token_rows is not None:
        raise ValueError("PEFT adapter export: trained token rows have no place in a LoRA adapter; merge and "
                         "export the full model instead (--format llava-hf)")
    tensors = _released_lora(vlm)
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    with torch.device("meta"):
        released = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(str(base)))
    released.name_or_path = str(base)  # what peft writes as base_model_name_or_path
    config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=r".*language_model.*\.(" + "|".join(targets) + ")$",
                        modules_to_save=["multi_modal_projector"], base_model_name_or_path=str(base))
    peft_model = get_peft_model(released, config)
    proj = vlm.projector.mlp
    wrapped = "base_model.model.model.multi_modal_projector.modules_to_save.default."
    for i, layer in ((0, "linear_1"), (2, "linear_2")):
        for kind in ("weight", "bias"):
            tensors[f"{wrapped}{layer}.{kind}"] = getattr(proj[i], kind).detach().float().clone()
    missing = set(tensors) - set(peft_model.state_dict())
    assert not missing, f"names the released peft model lacks: {sorted(missing)[:4]}"
    peft_model.load_state_dict(tensors, strict=False, assign=True)
    peft_model.save_pretrained(str(dst))
    return Path(dst)


def _image_processor(backend: str, pp: dict, res=None):
    """The transformers image processor matching our tower's preprocessing facts (LLaVA-NeXT's for anyres:
    its PIL backend, the one visual/anyres.py equals)."""
    size, mean, std = pp["size"], list(pp["mean"]), list(pp["std"])
    if res is not None and res.mode == "anyres":
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=mean,
            image_std=std, resample=int(RESAMPLE[pp["resample"]]),
            image_grid_pinpoints=[[int(h), int(w)] for h, w in res.pinpoints])
    if backend == "hf_siglip":
        return SiglipImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=mean, image_std=std)


def _hf_tokenizer(vlm, tmp: Path):
    """A transformers tokenizer for the export: the LM's own, or Qwen-1's as converted by qwen.convert."""
    tok = vlm.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; set VLMConfig.tokenizer before exporting")
    inner = getattr(tok, "hf_tokenizer", None)
    if inner is not None:
        return inner
    converted = tmp / "lm_qwen2"  # written by _lm_as_transformers for a Qwen-1 LM
    if not (converted / "tokenizer.json").is_file():
        convert_tokenizer(tok, converted)
    return AutoTokenizer.from_pretrained(str(converted))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Export a trained VLM to a standard format.")
    ap.add_argument("--src", required=True, help="run directory or saved model directory")
    ap.add_argument("--dst", required=True)
    ap.add_argument("--format", default="llava-hf", choices=FORMATS)
    args = ap.parse_args(argv)
    src = resolve_model_dir(args.src)  # a bad source fails before the destination is made
    writable_dir(args.dst, "--dst")
    _refuse_released_llava(src, args)  # before the model loads
    vlm = load_vlm(src).float().eval()
    if isinstance(vlm, ReleasedVLM):
        return _export_released(vlm, args)
    if args.format == "llava-hf":
        vlm.merge_lora()
        vlm.fold_token_rows()  # trained token rows go into the embedding table the export carries
    try:
        out = export_llava_hf(vlm, args.dst) if args.format == "llava-hf" else export_peft_adapter(vlm, args.dst)
    except ValueError as e:  # the model does not fit the format: say why
        raise UserError(f"export: {e}") from None
    print(f"exported {args.src} -> {out} ({args.format})")
    return 0


def _refuse_released_llava(src: Path, args) -> None:
    """A released wrapper family (a released directory or a run trained from one) has no llava-hf layout."""
    trained = src / RELEASED_FILE
    family = json.loads(trained.read_text()).get("family") if trained.is_file() else getattr(family_of(src), "name", None)
    if args.format != "peft-adapter" and family in FAMILIES and not FAMILIES[family].native:
        raise UserError(f"export: {args.src} is a {family} model, which has no {args.format} layout: "
                        "write its own released layout with python -m qwenvl_lab.model.merge, or use "
                        "--format peft-adapter for the unmerged adapter")


def _export_released(vlm: ReleasedVLM, args) -> int:
    """A released wrapper family: its adapter for the released base (LoRA + modules_to_save)."""
    try:
        out, modules = export_released_peft(vlm, args.dst)
    except ValueError as e:
        raise UserError(f"export: {e}") from None
    print(f"exported {args.src} -> {out} (peft-adapter for {vlm.source}; modules_to_save: {', '.join(modules) or 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
