"""Released wrapper families (model/families.py, model/released.py) against transformers, on tiny random models.

Each family's tiny checkpoint is the released layout: `save_pretrained` of the transformers model and of its
processor (built from its classes, a locally made tokenizer), with the published chat template in
chat_template.jinja; our side loads it back through `load_vlm` / `build_vlm(init_from=...)`.
Asserted per family:
- a 2-image LLaVA-format record renders to the processor's input_ids; every image-span token is -100;
- our loss equals `model(**processor_inputs, labels=ours).loss` within 1e-5;
- labels equal the assistant mask of a `{% generation %}` template;
- per-sample logits in a right-padded batch equal the unpadded ones within 1e-6;
- greedy `chat` equals transformers' generate on the processor's inputs;
- a record with an image and a video (frames from our frame sampler) renders to the processor's input_ids,
  every span token -100, loss equal to transformers'; greedy `chat` about a video equals its generate.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from qwenvl_lab.core.errors import UserError
from qwenvl_lab.dataset.sample import Sample
from qwenvl_lab.model.families import FAMILIES, family_of
from qwenvl_lab.model.model import build_vlm, load_vlm
from qwenvl_lab.model.released import ReleasedVLM
from qwenvl_lab.qwen.convert import tiktoken_to_hf

from tests.released_stages import STAGE_CASES, assert_first_adam_step, generate_reply, trainable_parts
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


def _images(seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(84, 56), (56, 112)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes]


def _qwen_vl(name: str, tok, intermediate: int = 96):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"))
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=56)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))


def write_released(path, name: str, template: str = QWEN_TEMPLATE, intermediate: int = 96):
    """A tiny released checkpoint of family `name` in its own layout (model, processor, chat template); the LM's
    `intermediate` width 128 makes every LM linear fit bitsandbytes' CPU 4-bit layout (QLoRA)."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = PreTrainedTokenizerFast(tokenizer_object=tiktoken_to_hf(_tiny_ranks(), QWEN_SPECIALS),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    model = _qwen_vl(name, tok, intermediate)
    randomize_(model, seed=1)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path))
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=template).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def released(request, tmp_path_factory):
    from transformers import AutoProcessor

    path = write_released(tmp_path_factory.mktemp(request.param), request.param)
    model = load_vlm(path)
    return request.param, path, model, AutoProcessor.from_pretrained(str(path))


def _reference(processor, messages=HF_MESSAGES, images=None):
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(text=[text], images=images or _images(), return_tensors="pt")


def test_family_entries_and_lookup(released):
    name, path, model, _ = released
    assert isinstance(model, ReleasedVLM) and family_of(path) is FAMILIES[name]
    assert not FAMILIES[name].native and "generate" in FAMILIES[name].serving
    assert isinstance(build_vlm({"init_from": str(path)}), ReleasedVLM)
    with pytest.raises(UserError, match="max_pixel"):
        ReleasedVLM.from_pretrained(path, max_pixel=100)


def test_ids_equal_processor_and_spans_are_masked(released):
    _, _, model, processor = released
    ours = model.render(RECORD, _images())
    ref = _reference(processor)
    assert ours["input_ids"] == ref["input_ids"][0].tolist()
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    span = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")}
    labels = ours["labels"]
    assert all(y == -100 for t, y in zip(ours["input_ids"], labels) if t in span)
    assert processor.tokenizer.decode([y for y in labels if y != -100]) == (
        "A red square.<|im_end|>\nA blue circle, small.<|im_end|>\n")


def test_loss_equals_transformers(released):
    _, _, model, processor = released
    ours = model.render(RECORD, _images())
    ids, labels = torch.tensor([ours["input_ids"]]), torch.tensor([ours["labels"]])
    ref = _reference(processor)
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                     pixel_values=ours["pixel_values"], image_grid_thw=ours["image_grid_thw"]).loss
        hf = model.model(**ref, labels=labels).loss
    assert abs(loss.item() - hf.item()) < 1e-5


def test_labels_equal_generation_template_mask(tmp_path):
    from transformers import AutoProcessor

    tagged = QWEN_TEMPLATE.replace(
        "{% else %}{% for content in message['content'] %}",
        "{% else %}{% if message['role'] == 'assistant' %}{% generation %}{% for content in message['content'] %}"
        "{{ content['text'] }}{% endfor %}<|im_end|>\n{% endgeneration %}{% else %}"
        "{% for content in message['content'] %}",
    ).replace("<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}",
              "<|im_end|>\n{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}")
    path = write_released(tmp_path / "q", "qwen2_vl", template=tagged)
    model, processor = load_vlm(path), AutoProcessor.from_pretrained(str(path))
    ours = model.render(RECORD, _images())
    images = iter(_images())
    messages = [{**m, "content": [{**p, "image": next(images)} if p["type"] == "image" else p for p in m["content"]]}
                for m in HF_MESSAGES]
    ref = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ours["input_ids"] == list(ref["input_ids"][0])
    mask = list(ref["assistant_masks"][0])
    assert [y != -100 for y in ours["labels"]] == [bool(m) for m in mask]


def test_padded_batch_logits_equal_unpadded(released):
    # float64: the check is about padding (masks, M-RoPE positions), not fp32 GEMM rounding across batch shapes
    model = copy.deepcopy(released[2]).double()
    short = Sample(id="s", images=["a.png"], messages=RECORD.messages[:2])
    rows = [model.render(RECORD, _images()), model.render(short, _images()[:1])]
    width = max(len(r["input_ids"]) for r in rows)
    pad = model.pad_token_id
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])  # [B, T]
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([r["pixel_values"] for r in rows]).double(),
                      image_grid_thw=torch.cat([r["image_grid_thw"] for r in rows])).logits
        for i, r in enumerate(rows):
            one = torch.tensor([r["input_ids"]])
            alone = model(input_ids=one, attention_mask=torch.ones_like(one), pixel_values=r["pixel_values"].double(),
                          image_grid_thw=r["image_grid_thw"]).logits[0]
            assert (batch[i, : len(r["input_ids"])] - alone).abs().max().item() < 1e-6


def test_greedy_chat_equals_transformers_generate(released):
    _, _, model, processor = released
    messages = [{"role": "user", "content": "<image> and <image>: which is red?"}]
    reply = model.chat(_images(), messages, max_new_tokens=8)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " and "},
                                                {"type": "image"}, {"type": "text", "text": ": which is red?"}]}]
    text = processor.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    ref = processor(text=[text], images=_images(), return_tensors="pt")
    assert model.chat_ids(messages, 2, model.image_tokens(_images())) == ref["input_ids"][0].tolist()
    assert reply == generate_reply(model, ref, 8)


def test_a_video_record_ids_loss_and_chat_equal_transformers(released, tmp_path):
    from qwenvl_lab.dataset.hf_chat import hf_messages
    from qwenvl_lab.dataset.images import load_video_frames

    from tests.tiny_data import write_video

    _, _, model, processor = released
    frames = load_video_frames(str(write_video(tmp_path / "v.mp4", n_frames=10, size=(56, 56))), 4)  # our sampler
    sample = Sample(id="v", images=["a.png"], videos=["v.mp4"], messages=[
        {"role": "user", "content": "<video>\nWhat happens? And in <image>?"},
        {"role": "assistant", "content": "It gets brighter; a square."}])
    ours = model.render(sample, _images()[:1], videos=[frames])
    text = processor.apply_chat_template(hf_messages(sample), tokenize=False)
    ref = processor(text=[text], images=_images()[:1], videos=[frames], return_tensors="pt")
    assert ours["input_ids"] == ref["input_ids"][0].tolist()
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    grid = ref["video_grid_thw"][0]
    assert ours["input_ids"].count(video_id) == int(grid.prod()) // 4  # 2 x 2 merge
    labels = ours["labels"]
    assert all(y == -100 for t, y in zip(ours["input_ids"], labels) if t == video_id)
    assert processor.tokenizer.decode([y for y in labels if y != -100]) == "It gets brighter; a square.<|im_end|>\n"
    ids, target = torch.tensor([ours["input_ids"]]), torch.tensor([labels])
    inputs = {k: v for k, v in ours.items() if torch.is_tensor(v)}
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=target, **inputs).loss
        hf = model.model(**ref, labels=target).loss
    assert abs(loss.item() - hf.item()) < 1e-5

    messages = [{"role": "user", "content": "<video>\nWhat happens?"}]
    reply = model.chat([], messages, videos=[frames], max_new_tokens=6)
    question = Sample(id="q", videos=["v.mp4"], messages=messages)
    prompt = processor.apply_chat_template(hf_messages(question), tokenize=False, add_generation_prompt=True)
    ref = processor(text=[prompt], videos=[frames], return_tensors="pt")
    assert model.chat_ids(messages, 0, [], model.video_tokens([frames])) == ref["input_ids"][0].tolist()
    assert reply == generate_reply(model, ref, 6)


# ----- stages: what trains, at which rate, and the adapter in PEFT's format ---------------------------------
def _fresh(path) -> ReleasedVLM:
    return ReleasedVLM.from_pretrained(path)


@pytest.mark.parametrize("stage,vision_lr,want", STAGE_CASES)
def test_stages_train_the_family_parts(released, stage, vision_lr, want):
    from qwenvl_lab.model.stages import apply_lora, set_trainable
    from qwenvl_lab.model.train_config import LoraSettings

    model = _fresh(released[1])
    if stage == "sft":
        apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))  # no targets: the family's LM linears
        adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
        assert adapted and all(".language_model." in n for n in adapted)
        assert {n.rsplit(".", 1)[1] for n in adapted} == set(FAMILIES[released[0]].notes["lora_targets"].split("|"))
    set_trainable(model, stage, vision_lr)
    assert trainable_parts(model) == want


def test_one_sft_step_moves_only_adapters_and_projector_at_their_rates(released):
    from peft import PeftModel
    from qwenvl_lab.model.stages import apply_lora, set_trainable
    from qwenvl_lab.model.train_config import LoraSettings
    from qwenvl_lab.trainer.optim import param_groups

    name, path, _, _ = released
    model = _fresh(path)
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    set_trainable(model, "sft")
    with torch.no_grad():  # lora_B starts at 0: give it a value so lora_A gets a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = param_groups(model, learning_rate=1e-3, projector_lr=2e-3, vision_lr=0.0, weight_decay=0.0)
    assert {g["name"].removesuffix("_no_decay"): g["lr"] for g in groups} == {"lm": 1e-3, "projector": 2e-3}
    ours = model.render(RECORD, _images())
    ids = torch.tensor([ours["input_ids"]])
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([ours["labels"]]),
                 pixel_values=ours["pixel_values"], image_grid_thw=ours["image_grid_thw"]).loss
    loss.backward()
    torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-12).step()
    assert_first_adam_step(groups, model, before)  # vision tower and base LM bit-identical
    model.save_pretrained(path.parent / "run", trainable_only=True)
    base = _fresh(path).model
    peft = PeftModel.from_pretrained(base, str(path.parent / "run" / "lora"))
    ours_lora = {n.removeprefix("model."): p for n, p in model.named_parameters() if "lora_" in n}
    loaded = dict(peft.named_parameters())
    assert ours_lora and all(torch.equal(loaded[n], p) for n, p in ours_lora.items())


def _sft_config(tmp_path, path, **lora):
    """A one-step sft run from the released `path` on a 2-image, 2-turn record written twice (the same images
    and data for every family test that trains through train())."""
    import json

    from tests.tiny_train import tiny_train_config

    for i, img in enumerate(_images()):
        img.save(tmp_path / f"{'ab'[i]}.png")
    record = {"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the first picture?"}, {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "And here <image> what?"}, {"from": "gpt", "value": "A blue circle, small."}]}
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(record) for _ in range(2)) + "\n")
    return tiny_train_config(tmp_path, tmp_path, model=None, init_from=str(path), stage="sft", max_steps=1,
                             per_device_train_batch_size=2, learning_rate=1e-3, projector_lr=2e-3, vision_lr=0.0,
                             lora={"r": 4, "alpha": 8, "dropout": 0.0, **lora}, max_length=400, weight_decay=0.0)


def test_one_sft_step_through_train(released, tmp_path):
    from qwenvl_lab.trainer.run import train

    name, path, _, _ = released
    cfg = _sft_config(tmp_path, path)
    result = train(cfg)
    base = dict(_fresh(path).named_parameters())
    trained = {n.removeprefix("model.").removeprefix("base_model.model."): p for n, p in result.model.named_parameters()}
    for n, p in trained.items():
        if "lora_" in n:
            continue
        hf = n.replace(".base_layer.", ".")
        if ".visual.merger." in n:  # the projector moved by its own rate (Adam's first step: lr per entry)
            step = (p.detach() - base["model." + hf]).abs()
            assert torch.allclose(step[step > 0].median(), torch.tensor(2e-3), rtol=0.05), n
        else:  # vision and base LM weights untouched
            assert torch.equal(p.detach(), base["model." + hf].detach()), n
    lora_b = [p for n, p in trained.items() if "lora_B" in n]
    assert lora_b and all(torch.allclose(p.abs().max(), torch.tensor(1e-3), rtol=0.05) for p in lora_b)
    final = load_vlm(tmp_path / "run")  # the run directory's final/: the released base + adapter + projector
    assert isinstance(final, ReleasedVLM)
    for n, p in final.named_parameters():
        assert torch.equal(p, dict(result.model.named_parameters())[n]), n


def test_qlora_sft_step_on_a_released_model(tmp_path):
    """lora.qlora on a wrapper family: the LM's linear layers become 4-bit NF4 (bitsandbytes), one sft step through
    train() moves the adapters and the merger and leaves the 4-bit weights and the tower as they were."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install '.[qlora]')")
    from qwenvl_lab.trainer.run import build_model, train

    cfg = _sft_config(tmp_path, write_released(tmp_path / "wide", "qwen2_vl", intermediate=128), qlora=True)
    before = {n: p.detach().clone() for n, p in build_model(cfg).named_parameters()}
    result = train(cfg)
    four_bit = [m for m in result.model.lm.modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == 14  # q/k/v/o/gate/up/down x 2 layers
    after = dict(result.model.named_parameters())
    assert after.keys() == before.keys()
    moved = {n for n in after if not torch.equal(after[n].detach(), before[n])}
    assert moved and all("lora_" in n or ".visual.merger." in n for n in moved), sorted(moved)[:5]
    assert any("lora_B" in n for n in moved) and any(".visual.merger." in n for n in moved)


def test_recipes_name_the_released_hub_ids_and_offline_is_one_line():
    from pathlib import Path

    import yaml
    from qwenvl_lab.model.paths import ModelDirError, resolve_model_dir

    root = Path(__file__).resolve().parents[1] / "configs" / "released"
    ids = {p.name: yaml.safe_load(p.read_text())["init_from"] for p in root.glob("*.yaml")}
    assert ids == {"qwen2_vl_lora.yaml": "Qwen/Qwen2-VL-2B-Instruct",
                   "qwen2_5_vl_lora.yaml": "Qwen/Qwen2.5-VL-7B-Instruct",
                   "idefics3_lora.yaml": "HuggingFaceM4/Idefics3-8B-Llama3",
                   "smolvlm_lora.yaml": "HuggingFaceTB/SmolVLM-Instruct",
                   "llava_next_7b_lora.yaml": "llava-hf/llava-v1.6-vicuna-7b-hf",
                   "llava_onevision_lora.yaml": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
                   "llava_next_video_lora.yaml": "llava-hf/LLaVA-NeXT-Video-7B-hf"}
    with pytest.raises(ModelDirError, match="could not be fetched"):
        resolve_model_dir("no-such-org-xyz/no-such-model")  # tests run with HF_HUB_OFFLINE=1


@pytest.mark.parametrize("key,value", [("packing", True), ("feature_cache", "cache_dir"), ("fused_impl", "torch")])
def test_features_that_cannot_apply_are_refused(released, tmp_path, key, value):
    from qwenvl_lab.core.config_io import ConfigError
    from qwenvl_lab.trainer.run import build_model

    from tests.tiny_train import tiny_train_config

    (tmp_path / "train.jsonl").write_text("{}\n")
    cfg = tiny_train_config(tmp_path, tmp_path, model=None, init_from=str(released[1]), stage="sft",
                            lora={"r": 4}, **{key: value})
    with pytest.raises(ConfigError, match=f"^{key}: not available for the released family"):
        build_model(cfg)


def test_chat_batch_equals_chat_alone(released):
    model = released[2]
    convs = [(_images(), [{"role": "user", "content": "<image> and <image>: which is red?"}]),
             (_images(1)[:1], [{"role": "user", "content": "Describe."}])]  # no marker: the image goes first
    assert model.chat_batch(convs, max_new_tokens=6) == [model.chat(i, m, max_new_tokens=6) for i, m in convs]


def test_test_py_answers_with_a_released_checkpoint(released, tmp_path, capsys):
    from tests.tiny_server import answer_of_test_py

    _, path, model, _ = released
    _images()[0].save(tmp_path / "a.png")
    answer = answer_of_test_py(["--model", str(path), "--image", str(tmp_path / "a.png"), "--prompt", "What is it?",
                                "--max-new-tokens", "5"], capsys)
    assert answer == model.chat(_images()[:1], [{"role": "user", "content": "What is it?"}], max_new_tokens=5)
