"""Tiny released LLaVA-OneVision and LLaVA-NeXT-Video checkpoints, written in the released layout.

Each is `save_pretrained` of the transformers model (built from configs: a tiny SigLIP / CLIP tower, a tiny
Qwen2 / Llama LM) and of its processor (a locally made byte-level tokenizer with `<image>` / `<video>` added,
the image and video processors sized to the tower, the published chat template), so `AutoProcessor` and
`load_vlm` read exactly what a user's download holds.
"""

from __future__ import annotations

from pathlib import Path

from tests.tiny_model import randomize_
from tests.tiny_qwen import QWEN2_SPECIALS, QWEN2_VL, _tiny_ranks

# llava-onevision-qwen2-*-hf (its conversion script's template): a message's images, then its videos, then its text.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# LLaVA-NeXT-Video-7B-hf (Vicuna): "USER: <video>\n... ASSISTANT: ... ", no end-of-turn token.
NEXT_VIDEO_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TOWER = 32  # the tower's image size (px); patch 8 -> a 4 x 4 grid per crop
# Pinpoints up to 4 x 4 crops: a large image's unpadded grid exceeds anyres_max_9 and is downscaled.
PINPOINTS = [[32, 64], [64, 32], [64, 64], [64, 128], [128, 64], [96, 96], [128, 128]]


# Merges across the Vicuna template's turn boundary ("... square. " + "USER: ..."): tokenized whole, " USER"
# is one pre-token and " U" merges; tokenized turn by turn it would not. Real BPE vocabularies have such merges.
BOUNDARY_MERGES = [" U", " US", "SE", " USE", " USER"]


def _tokenizer(path: Path, bos: bool):
    """The tiny byte-level tokenizer (plus BOUNDARY_MERGES) with `<image>` and `<video>` added (special);
    `bos`: a Llama-style `<s>` prepended by its post-processor, as the Vicuna tokenizer does."""
    from qwenvl_lab.qwen.convert import tiktoken_to_hf
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    ranks = _tiny_ranks()
    for m in BOUNDARY_MERGES:
        ranks[m.encode("utf-8")] = len(ranks)
    specials = [s for s in QWEN2_SPECIALS if s not in QWEN2_VL]
    tok = PreTrainedTokenizerFast(tokenizer_object=tiktoken_to_hf(ranks, specials), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<image>", "<video>")],
                   special_tokens=True)
    if bos:
        tok.add_special_tokens({"bos_token": "<s>"})
        bos_id = tok.convert_tokens_to_ids("<s>")
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    return tok


def save_onevision(path: Path, seed: int = 0) -> Path:
    """A tiny LlavaOnevisionForConditionalGeneration (SigLIP 32 px / patch 8, Qwen2 LM) with its processor."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    path = Path(path)
    tok = _tokenizer(path, bos=False)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=TOWER, patch_size=8, vision_use_head=False)
    tc = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_9")
    model = LlavaOnevisionForConditionalGeneration(cfg)
    randomize_(model, seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path))
    size = {"height": TOWER, "width": TOWER}
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tok, num_image_tokens=(TOWER // 8) ** 2,
        vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE, vision_aspect_ratio="anyres_max_9",
    ).save_pretrained(str(path))
    return path


def save_next_video(path: Path, seed: int = 0) -> Path:
    """A tiny LlavaNextVideoForConditionalGeneration (CLIP 32 px / patch 8 + CLS, Llama LM, average pooling
    with stride 2) with its processor and a `<s>`-prepending tokenizer."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    path = Path(path)
    tok = _tokenizer(path, bos=True)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=TOWER, patch_size=8)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaNextVideoConfig(vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_select_strategy="default", vision_feature_layer=-2,
                               image_grid_pinpoints=PINPOINTS, spatial_pool_mode="average", spatial_pool_stride=2)
    model = LlavaNextVideoForConditionalGeneration(cfg)
    randomize_(model, seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path))
    size, crop = {"shortest_edge": TOWER}, {"height": TOWER, "width": TOWER}
    LlavaNextVideoProcessor(
        image_processor=LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaNextVideoVideoProcessor(size=size, crop_size=crop), tokenizer=tok, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=NEXT_VIDEO_TEMPLATE,
    ).save_pretrained(str(path))
    return path
