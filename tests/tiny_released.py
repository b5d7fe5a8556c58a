"""Tiny released checkpoints in their own layouts, built from configs with a locally made tokenizer (no downloads).

- `write_released(dir, name)`, `RECORD`, `HF_MESSAGES`, `images(seed)`: the Qwen2-VL / Qwen2.5-VL fixture of
  tests/test_families.py, imported from there (one copy): a tiny checkpoint in its released layout, a 2-image
  two-turn record, the two PIL images (84x56 and 56x112).
- `write_llava15(dir) -> Path`: a tiny LLaVA-1.5 checkpoint (Llama LM, a Llama-style tokenizer made here, CLIP)
  with its released chat template in chat_template.json only; `LLAVA15_TEMPLATE`, `llama_tokenizer()`.
"""

from __future__ import annotations

from tests.test_families import HF_MESSAGES, RECORD, write_released
from tests.test_families import _images as images
from tests.tiny_model import randomize_

__all__ = ["HF_MESSAGES", "LLAVA15_TEMPLATE", "RECORD", "images", "llama_tokenizer", "write_llava15", "write_released"]

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
