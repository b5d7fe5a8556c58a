"""Merge (LoRA folded into the LM) and export to transformers' Llava layout, checked by logits."""

from __future__ import annotations

import pytest
import torch
from qwenvl_lab.model.stages import apply_lora
from qwenvl_lab.model.train_config import LoraSettings

from tests.tiny_model import build_tiny_vlm, randomize_


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
    from qwenvl_lab.model.export import export_llava_hf
    from transformers import AutoModelForImageTextToText, AutoProcessor

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
    from qwenvl_lab.model import VLM
    from qwenvl_lab.model.merge import merge

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
    from qwenvl_lab.model.export import export_llava_hf

    vlm = build_tiny_vlm(tmp_path, tower="timm_cnn")
    with pytest.raises(ValueError, match="CLIP or SigLIP"):
        export_llava_hf(vlm, tmp_path / "x")


# ----- the export generates like our model and carries what vLLM reads ---------------------------------
SQUARE = (32, 32)  # the tiny CLIP's input size: our resize and CLIP's resize + centre crop give the same pixels


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from qwenvl_lab.model.export import main as export_main

    from tests.tiny_serve import image, stopping_vlm

    tmp = tmp_path_factory.mktemp("export_gen")
    vlm = stopping_vlm(tmp, size=SQUARE)
    vlm.save_pretrained(tmp / "model")
    image(0, SQUARE).save(tmp / "q.png")
    assert export_main(["--src", str(tmp / "model"), "--dst", str(tmp / "llava")]) == 0
    return vlm, tmp


def test_export_generate_stops_at_end_of_turn_and_equals_test_py(exported, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.tiny_serve import QUESTION, image, messages
    from tests.tiny_server import answer_of_test_py

    vlm, tmp = exported
    expect = answer_of_test_py(["--model", str(tmp / "model"), "--image", str(tmp / "q.png"), "--prompt",
                                QUESTION, "--max-new-tokens", "8"], capsys)
    assert expect

    hf = AutoModelForImageTextToText.from_pretrained(str(tmp / "llava"), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(tmp / "llava"))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + QUESTION}]}]
    enc = proc(images=[image(0, SQUARE)], text=proc.apply_chat_template(chat, add_generation_prompt=True),
               return_tensors="pt")
    assert enc["input_ids"][0].tolist() == vlm.chat_ids(messages(), 1)
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=8, do_sample=False)  # no eos given: the export's own
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    end_of_turn = vlm.stop_token_ids[0]
    assert new[-1] == end_of_turn and len(new) < 8, new  # it stopped, at <|im_end|>
    assert proc.tokenizer.decode(new[:-1], skip_special_tokens=True) == expect


def test_export_config_holds_every_field_vllm_llava_reads(exported):
    """The fields vLLM's LLaVA loader (vllm/model_executor/models/llava.py and the CLIP/SigLIP encoder
    info it calls) and its OpenAI server read; vLLM cannot run here (no GPU), so this is the contract."""
    import json

    from transformers import AutoConfig, AutoProcessor

    vlm, tmp = exported
    dst = tmp / "llava"
    raw = json.loads((dst / "config.json").read_text())
    assert raw["architectures"] == ["LlavaForConditionalGeneration"] and raw["model_type"] == "llava"
    cfg = AutoConfig.from_pretrained(str(dst))  # vLLM reads the config through transformers
    assert cfg.image_token_index == vlm.image_token_id
    tower = vlm.towers
    # Values equal to the exported model's (a class default would pass a mere presence check).
    assert cfg.vision_feature_layer == tower.feature_layer
    assert cfg.vision_feature_select_strategy == ("default" if tower.has_cls else "full")  # patch tokens only
    v, own = cfg.vision_config, tower.model.config
    assert v.model_type == own.model_type
    keys = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "layer_norm_eps")
    assert {k: getattr(v, k) for k in keys} == {k: getattr(own, k) for k in keys}
    assert own.image_size != 336 and own.hidden_size != 1024  # not LlavaConfig's default CLIP-L tower
    t = raw["text_config"]
    assert t["architectures"] == ["Qwen2ForCausalLM"]  # vLLM builds the LM from this name
    for key in ("model_type", "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings"):
        assert t.get(key) is not None, key
    assert "rope_theta" in t or "rope_parameters" in t
    # vLLM's count of image tokens: patches (+1 CLS for CLIP), minus the CLS for strategy "default".
    n = (v.image_size // v.patch_size) ** 2 + (v.model_type == "clip_vision_model")
    n -= cfg.vision_feature_select_strategy == "default"
    assert n == vlm.tokens_per_image == raw["image_seq_length"]
    # Generation stops at end of turn, in both places vLLM and transformers look.
    eos = [vlm.stop_token_ids[0], vlm.pad_token_id]
    gen = json.loads((dst / "generation_config.json").read_text())
    for ids in (gen["eos_token_id"], t["eos_token_id"]):
        assert ids[0] == eos[0] and set(eos) <= set(ids) and ids == list(vlm.stop_token_ids)
    assert gen["pad_token_id"] == vlm.pad_token_id
    # The processor vLLM loads: the placeholder token, patch size and strategy, and a chat template.
    proc = AutoProcessor.from_pretrained(str(dst))
    assert proc.tokenizer.convert_tokens_to_ids(proc.image_token) == vlm.image_token_id
    assert proc.patch_size == v.patch_size and proc.vision_feature_select_strategy == cfg.vision_feature_select_strategy
    assert proc.chat_template and "<|im_start|>" in proc.chat_template


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_export_of_another_lm_family_keeps_its_chat_template_ids_and_logits(tmp_path, family):
    """A Llama-3 / Gemma LM (its own template, `<image>` added by us): the exported processor renders a
    conversation with images to exactly our ids, and the Llava model gives our logits."""
    from PIL import Image
    from qwenvl_lab.model import build_vlm
    from qwenvl_lab.model.export import export_llava_hf
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.tiny_lms import write_tiny_family
    from tests.tiny_model import tiny_tower_spec

    lm = write_tiny_family(tmp_path / family, family)
    vlm = build_vlm(dict(lm=str(lm), lm_backend="hf", towers=[tiny_tower_spec(tmp_path, "clip")],
                         image_mode="resize")).eval()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nhello there"},
            {"role": "assistant", "content": "a hat"}, {"role": "user", "content": "and <image> this?"}]
    ids = torch.tensor([vlm.chat_ids(msgs, 2)])
    img = Image.new("RGB", (32, 32), (200, 10, 10))
    pixels = vlm.image_processor([img, img])
    with torch.no_grad():
        ours = vlm(input_ids=ids, pixel_values=pixels).logits
    export_llava_hf(vlm, tmp_path / "llava")
    proc = AutoProcessor.from_pretrained(str(tmp_path / "llava"))
    hf_msgs = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nhello there"}]},
               {"role": "assistant", "content": "a hat"},
               {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "image"},
                                            {"type": "text", "text": " this?"}]}]
    text = proc.apply_chat_template(hf_msgs, add_generation_prompt=True)
    enc = proc(images=[img, img], text=text, return_tensors="pt", add_special_tokens=False)
    assert enc["input_ids"][0].tolist() == ids[0].tolist()
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "llava"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max().item() < 1e-5
