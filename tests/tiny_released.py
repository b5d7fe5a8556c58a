"""Tiny released checkpoints in their own layouts, built from configs with a locally made tokenizer (no downloads).

- `write_released(dir, name, template=QWEN_TEMPLATE) -> Path`: a Qwen2-VL (`name="qwen2_vl"`) or Qwen2.5-VL
  (`"qwen2_5_vl"`) checkpoint: transformers' `save_pretrained` of the model and of its processor, the chat
  template in the processor's files, as the hub's directories are.
- `RECORD` (a 2-image two-turn `Sample`), `HF_MESSAGES` (the same conversation in transformers' part layout),
  `images(seed)` (the two PIL images, 84x56 and 56x112), `FAMILY_NAMES`.
"""

from __future__ import annotations

import torch
from PIL import Image
from qwenvl_lab.dataset.sample import Sample
from qwenvl_lab.qwen.convert import tiktoken_to_hf

from tests.tiny_model import randomize_
from tests.tiny_qwen import _tiny_ranks

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-Instruct's published chat template (its chat_template.json), image/video parts only.
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
RECORD = Sample(id="r0", images=["a.png", "b.png"], messages=[
    {"role": "user", "content": "<image>\nWhat is in the first picture?"},
    {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": "And here <image> what?"},
    {"role": "assistant", "content": "A blue circle, small."},
])
HF_MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is in the first picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    {"role": "user", "content": [{"type": "text", "text": "And here "}, {"type": "image"},
                                 {"type": "text", "text": " what?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A blue circle, small."}]},
]
FAMILY_NAMES = ["qwen2_vl", "qwen2_5_vl"]


def images(seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(84, 56), (56, 112)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes]


def _qwen_vl(name: str, tok):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"))
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=56)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))


def write_released(path, name: str, template: str = QWEN_TEMPLATE):
    """A tiny released checkpoint of family `name` in its own layout (model, processor, chat template)."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = PreTrainedTokenizerFast(tokenizer_object=tiktoken_to_hf(_tiny_ranks(), QWEN_SPECIALS),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    model = _qwen_vl(name, tok)
    randomize_(model, seed=1)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path))
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=template).save_pretrained(str(path))
    return path


# LLaVA-1.5's released chat template (llava-hf/llava-1.5-*-hf chat_template.json): a message's images first,
# then its text; the assistant's text inside {% generation %}; no end-of-turn token.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_LLAMA_CORPUS = [
    "USER: ASSISTANT: What is in the first picture? A red square. And here what? A blue circle, small.",
    "What differs? The colour. Describe the image. It shows a shape on a plain background.",
]


def llama_tokenizer():
    """A Llama-style tokenizer made here: SentencePiece-like BPE (Metaspace, "▁" word prefix), <unk> <s> </s>,
    BOS added to every encoding as Llama's does, `<image>` and `<pad>` added as LLaVA-1.5's tokenizer has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(_LLAMA_CORPUS)) | set("\nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:"))
    tok.train_from_iterator(_LLAMA_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return hf


def write_llava15(path, seed: int = 0):
    """A tiny LLaVA-1.5 checkpoint (CLIP 32 px / patch 8 -> 16 tokens per image, Llama LM, vocab = the
    tokenizer's length) in the released layout: model, tokenizer, CLIP image processor, and the chat template
    in chat_template.json only (as llava-hf/llava-1.5-7b-hf ships it)."""
    import json
    from pathlib import Path

    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    tok = llama_tokenizer()
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg)
    randomize_(model, seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path))
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    processor.save_pretrained(str(path))
    for stale in ("chat_template.jinja",):
        (path / stale).unlink(missing_ok=True)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA15_TEMPLATE}, indent=2))
    return path
