"""Merge (LoRA folded into the LM) and export to transformers' Llava layout, checked by logits."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_model import build_tiny_vlm, randomize_
from trainer.stages import LoraSettings, apply_lora


def _inputs(vlm, n_images=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = vlm.tokenizer
    ids = vlm.chat_ids([{"role": "user", "content": "<image>\nhello there <image> what?"}], n_images)
    size = vlm.image_processor.size
    pixels = torch.randn(n_images, 3, size, size, generator=g)
    assert ids.count(vlm.image_token_id) == n_images * vlm.tokens_per_image
    assert tok.image_start_id in ids
    return torch.tensor([ids]), pixels


def _lora_vlm(tmp_path, randomize_base=True, **kw):
    vlm = build_tiny_vlm(tmp_path, **kw)
    if randomize_base:  # a trainable-only checkpoint points at the base weights, so keep them for merge
        randomize_(vlm, seed=1)
    apply_lora(vlm, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # non-zero adapters, so merging changes the weights
        for name, p in vlm.lm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    return vlm.eval()


@pytest.mark.parametrize("tower,lm_arch", [("clip", "qwen2"), ("siglip", "qwen1")])
def test_export_llava_hf_matches_logits(tmp_path, tower, lm_arch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from model.export import export_llava_hf

    vlm = _lora_vlm(tmp_path, tower=tower, lm_arch=lm_arch)
    input_ids, pixels = _inputs(vlm)
    with torch.no_grad():
        ours = vlm(input_ids=input_ids, pixel_values=pixels).logits
    vlm.merge_lora()
    export_llava_hf(vlm, tmp_path / "llava")
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "llava"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max().item() < 1e-5

    # The processor and chat template expand one placeholder per image to the same ids as our template.
    proc = AutoProcessor.from_pretrained(str(tmp_path / "llava"))
    from PIL import Image

    img = Image.new("RGB", (40, 30), (200, 10, 10))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nhello there "},
                                             {"type": "image"}, {"type": "text", "text": " what?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    enc = proc(images=[img, img], text=text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == input_ids[0].tolist()


def test_merge_gives_same_logits_and_standalone_model(tmp_path):
    from model import VLM
    from model.merge import merge

    vlm = _lora_vlm(tmp_path, randomize_base=False, tower="clip", lm_arch="qwen2")
    src = tmp_path / "run_final"
    vlm.save_pretrained(src, trainable_only=True)
    input_ids, pixels = _inputs(vlm)
    with torch.no_grad():
        before = vlm(input_ids=input_ids, pixel_values=pixels).logits
    out = merge(src, tmp_path / "merged")
    merged = VLM.from_pretrained(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert not (out / "lora").exists()
    with torch.no_grad():
        after = merged(input_ids=input_ids, pixel_values=pixels).logits
    assert (before - after).abs().max().item() < 1e-5


def test_export_refuses_what_llava_cannot_hold(tmp_path):
    from model.export import export_llava_hf

    vlm = build_tiny_vlm(tmp_path, tower="timm_cnn")
    with pytest.raises(ValueError, match="CLIP or SigLIP"):
        export_llava_hf(vlm, tmp_path / "x")
