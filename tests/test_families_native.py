"""Released native families (LLaVA-1.5 / llava-interleave with a Qwen2 LM): a transformers `llava` directory
with its own tokenizer, chat template and processor files, imported into our VLM.

- the ids our rendering gives equal `AutoProcessor`'s (`apply_chat_template` + `processor(text, images)`):
  each `<image>` becomes N image tokens and nothing around them (no Qwen `<|vision_start|>` / `<|vision_end|>`);
- a tokenizer without spare embedding rows (vocab_size == len(tokenizer), `<image>` added to it) imports
  without new ids past the table, and a training step's loss equals transformers' own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from qwenvl_lab.dataset.rendering import render
from qwenvl_lab.dataset.sample import Sample
from qwenvl_lab.model.families import FAMILIES, family_of
from qwenvl_lab.model.model import VLM

from tests.tiny_model import randomize_
from tests.tiny_qwen import write_tiny_hf_tokenizer

# The released llava-interleave-qwen layout: ChatML, each image item rendered as "<image>" in place.
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _qwen_tokenizer(path: Path, with_vl_tokens: bool):
    """The tiny Qwen2 tokenizer with `<image>` added last and the ChatML template."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok_dir = write_tiny_hf_tokenizer(path.parent / f"{path.name}_tok", with_vl_tokens=with_vl_tokens).parent
    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.chat_template = CHATML_JINJA
    return tok


def save_llava_qwen(path: Path, with_vl_tokens: bool, seed: int = 0, text: str = "qwen2") -> Path:
    """A tiny LlavaForConditionalGeneration (CLIP 32 px / patch 8 -> 16 tokens, Qwen2 LM) whose text vocab_size
    equals its tokenizer's length (`<image>` added last: no spare rows), with tokenizer_config.json's
    `chat_template` and the LlavaProcessor saved with save_pretrained."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    path = Path(path)
    tok = _qwen_tokenizer(path, with_vl_tokens)
    image_id = tok.convert_tokens_to_ids("<image>")
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8)
    text_cls = Qwen2Config if text == "qwen2" else LlamaConfig
    tc = text_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_id,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg)
    randomize_(model, seed)
    model.save_pretrained(str(path))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHATML_JINJA)
    processor.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]


RECORD = [{"role": "user", "content": "<image>\n<image>\nWhat differs?"}, {"role": "assistant", "content": "The colour."}]


def _processor_messages() -> list[dict]:
    """RECORD in the processor's item layout (images in place, same text)."""
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"},
                                     {"type": "text", "text": "\nWhat differs?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The colour."}]},
    ]


@pytest.fixture(params=[(True, "qwen2"), (False, "qwen2"), (False, "llama")],
                ids=["qwen_vl_vocab", "no_spare_rows", "llama_lm"])
def llava_qwen(request, tmp_path):
    """A llava directory (ChatML template) with a Qwen2 LM (our Qwen backend) or a Llama LM (transformers')."""
    vl, text = request.param
    return save_llava_qwen(tmp_path / "llava", with_vl_tokens=vl, text=text)


def _processor_inputs(path: Path, messages: list[dict], generation: bool):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return processor, processor(text=text, images=_images(), return_tensors="pt")


def test_llava_qwen_ids_equal_the_processors_and_loss_equals_transformers(llava_qwen):
    from transformers import LlavaForConditionalGeneration

    vlm = VLM.from_pretrained(llava_qwen).eval()
    text = json.loads((llava_qwen / "config.json").read_text())["text_config"]["model_type"]
    assert vlm.config.lm_backend == {"qwen2": "qwen", "llama": "hf"}[text]
    processor, inputs = _processor_inputs(llava_qwen, _processor_messages(), generation=False)
    want = inputs["input_ids"][0].tolist()
    tok = processor.tokenizer
    assert vlm.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert max(want) < vlm.lm.get_input_embeddings().weight.shape[0] if hasattr(vlm.lm, "get_input_embeddings") \
        else True
    sample = Sample(id="s", messages=[dict(m) for m in RECORD], images=["a", "b"])
    rendered = render(sample, vlm.chat_format, vlm.tokens_per_image, image_token_id=vlm.image_token_id)
    assert rendered.input_ids == want  # no <|vision_start|> / <|vision_end|> around the 16 image tokens
    assert want.count(vlm.image_token_id) == 2 * 16

    # Every id our tokenizer can produce fits the embedding table (no rows added past a full table).
    assert len(vlm.tokenizer) == len(tok)

    # Loss: assistant tokens (and their end of turn) only, image tokens -100; same pixels as the processor.
    labels = torch.tensor([rendered.labels])
    assert (labels[torch.tensor([want]) == vlm.image_token_id] == -100).all()
    ref = LlavaForConditionalGeneration.from_pretrained(str(llava_qwen)).eval()
    ids = torch.tensor([want])
    with torch.no_grad():
        theirs = ref(**inputs, labels=labels).loss
        ours = vlm(ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                   image_counts=[2], labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_llava_qwen_chat_ids_equal_the_processors(llava_qwen):
    vlm = VLM.from_pretrained(llava_qwen).eval()
    _, inputs = _processor_inputs(llava_qwen, _processor_messages()[:1], generation=True)
    assert vlm.chat_ids(RECORD[:1], 2) == inputs["input_ids"][0].tolist()


def test_llava_without_spare_rows_trains(tmp_path):
    """vocab_size == len(tokenizer) with `<image>` added: no id past the table (was an IndexError when the
    import's tokenizer added Qwen's vision tokens past it), and one backward gives finite gradients."""
    path = save_llava_qwen(tmp_path / "llava", with_vl_tokens=False)
    vlm = VLM.from_pretrained(path).train()
    sample = Sample(id="s", messages=[dict(m) for m in RECORD], images=["a", "b"])
    rendered = render(sample, vlm.chat_format, vlm.tokens_per_image, image_token_id=vlm.image_token_id)
    ids = torch.tensor([rendered.input_ids])
    loss = vlm(ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 32, 32),
               image_counts=[2], labels=torch.tensor([rendered.labels])).loss
    loss.backward()
    assert torch.isfinite(loss) and vlm.projector.mlp[0].weight.grad.abs().sum() > 0
    assert len(vlm.tokenizer) == vlm.lm.get_input_embeddings().weight.shape[0]


def save_llava_next_qwen(path: Path, seed: int = 0) -> Path:
    """A tiny LlavaNextForConditionalGeneration (CLIP 28 px / patch 14, pinpoints up to 84 px, Qwen2 LM) with
    its tokenizer (ChatML template) and LlavaNextProcessor saved with save_pretrained."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        Qwen2Config,
    )

    path = Path(path)
    tok = _qwen_tokenizer(path, with_vl_tokens=False)
    pins = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=14)
    tc = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=pins, vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaNextForConditionalGeneration(cfg)
    randomize_(model, seed)
    model.save_pretrained(str(path))
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pins,
        image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711), resample=3)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHATML_JINJA)
    processor.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_llava_next_ids_equal_the_processors(tmp_path):
    """Per-image anyres counts: render and chat_ids give LlavaNextProcessor's ids for a 300x200 and a 17x301
    image (different tile layouts), nothing around each span."""
    from transformers import AutoProcessor

    path = save_llava_next_qwen(tmp_path / "next")
    vlm = VLM.from_pretrained(path).eval()
    rng = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy())
              for w, h in ((300, 200), (17, 301))]
    processor = AutoProcessor.from_pretrained(str(path))
    text = processor.apply_chat_template(_processor_messages(), tokenize=False)
    want = processor(text=text, images=images, return_tensors="pt")["input_ids"][0].tolist()
    counts = vlm.image_tokens(images)
    assert counts[0] != counts[1]
    sample = Sample(id="s", messages=[dict(m) for m in RECORD], images=["a", "b"])
    rendered = render(sample, vlm.chat_format, lambda kind, i: counts[i], image_token_id=vlm.image_token_id)
    assert rendered.input_ids == want

    # Loss: ours equals transformers' on the processor's inputs (its PIL backend's pixels, which ours equal to
    # 1e-6: tests/test_anyres.py; the default torchvision backend resizes slightly differently).
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil

    inputs = processor(text=text, images=images, return_tensors="pt")
    inputs.update(LlavaNextImageProcessorPil.from_pretrained(str(path))(images, return_tensors="pt"))
    labels = torch.tensor([rendered.labels])
    assert (labels[inputs["input_ids"] == vlm.image_token_id] == -100).all() and (labels != -100).any()
    ref = LlavaNextForConditionalGeneration.from_pretrained(str(path)).eval()
    ids = torch.tensor([want])
    with torch.no_grad():
        theirs = ref(**inputs, labels=labels).loss
        ours = vlm(ids, attention_mask=torch.ones_like(ids), image_counts=[2], labels=labels,
                   **vlm.image_inputs(images)).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    prompt = processor.apply_chat_template(_processor_messages()[:1], tokenize=False, add_generation_prompt=True)
    want = processor(text=prompt, images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert vlm.chat_ids(RECORD[:1], 2, counts) == want


def test_native_family_entries(tmp_path):
    """family_of: LLaVA-1.5 and llava-interleave share model_type "llava", told apart by the checkpoint's own
    chat template (ChatML -> interleave); LLaVA-NeXT by its model_type; the module prefixes name real modules."""

    from transformers import LlavaForConditionalGeneration

    interleave = save_llava_qwen(tmp_path / "interleave", with_vl_tokens=False)
    assert family_of(interleave) is FAMILIES["llava-interleave"]
    v15 = tmp_path / "v15"  # LLaVA-1.5's layout: tokenizer_config.json's chat_template, USER/ASSISTANT
    v15.mkdir()
    (v15 / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (v15 / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] }}{% endfor %}"}))
    assert family_of(v15) is FAMILIES["llava"]
    assert family_of({"model_type": "llava_next"}) is FAMILIES["llava_next"]
    assert family_of({"model_type": "llava"}) is FAMILIES["llava"]
    names = [n for n, _ in LlavaForConditionalGeneration.from_pretrained(str(interleave)).named_parameters()]
    fam = FAMILIES["llava-interleave"]
    for prefixes in (fam.vision, fam.projector, fam.lm):
        assert all(any(n.startswith(p) for n in names) for p in prefixes)
    assert all(f.native for f in (FAMILIES["llava"], fam, FAMILIES["llava_next"]))
    assert FAMILIES["llava_next"].extra_inputs == ("image_sizes",)


@pytest.mark.parametrize("backend", ["qwen", "hf"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_logits_equal_unpadded(tmp_path, backend, side):
    """Two conversations of different lengths (2 images, 1 image) in one padded batch: each sample's logits at
    its real positions equal its own unpadded forward within 1e-6, with our Qwen and transformers' LM."""

    path = save_llava_qwen(tmp_path / "llava", with_vl_tokens=False)
    # fp64: a masking or position error shows at 1e-2, while fp32's batch-shape rounding alone reaches
    # ~1e-6 on these random weights (one element in 21868 at 1.01e-6, measured).
    vlm = VLM.from_pretrained(path, lm_backend=backend).eval().double()
    assert vlm.config.lm_backend == backend
    one = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A square."}]
    samples = [Sample(id="a", messages=[dict(m) for m in RECORD], images=["a", "b"]),
               Sample(id="b", messages=one, images=["c"])]
    ids = [render(s, vlm.chat_format, vlm.tokens_per_image, image_token_id=vlm.image_token_id).input_ids
           for s in samples]
    px = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    T = max(map(len, ids))
    batch = torch.full((2, T), vlm.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    spans = []
    for b, row in enumerate(ids):
        sl = slice(0, len(row)) if side == "right" else slice(T - len(row), T)
        batch[b, sl], mask[b, sl] = torch.tensor(row), 1
        spans.append(sl)
    with torch.no_grad():
        padded = vlm(batch, attention_mask=mask, pixel_values=px, image_counts=[2, 1]).logits
        alone = [vlm(torch.tensor([ids[0]]), pixel_values=px[:2], image_counts=[2]).logits[0],
                 vlm(torch.tensor([ids[1]]), pixel_values=px[2:], image_counts=[1]).logits[0]]
    assert len(ids[0]) != len(ids[1])
    for b in range(2):
        torch.testing.assert_close(padded[b, spans[b]], alone[b], rtol=0, atol=1e-6)


def _llava_records(d: Path) -> Path:
    """Four 2-image LLaVA-format records and their images."""

    for i, img in enumerate(_images() * 2):
        img.save(d / f"im{i}.png")
    rows = [{"id": str(i), "image": [f"im{2 * (i % 2)}.png", f"im{2 * (i % 2) + 1}.png"],
             "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat differs?"},
                               {"from": "gpt", "value": f"The colour {i}."}]} for i in range(4)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "train.jsonl"


def _sft(tmp_path: Path, path: Path, callbacks=()):
    """One stage=sft step (LoRA r=4, projector trained) through train() on the llava import at `path`."""
    import yaml
    from qwenvl_lab.model.train_config import load_train_config
    from qwenvl_lab.trainer.run import train

    data = tmp_path / "data"
    data.mkdir()
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "init_from": str(path), "data_path": [str(_llava_records(data))], "image_folder": str(data),
        "stage": "sft", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "learning_rate": 2e-3, "projector_lr": 5e-3,
        "vision_lr": 0.0, "warmup_ratio": 0.0, "per_device_train_batch_size": 2, "max_steps": 1, "max_length": 200,
        "logging_steps": 1, "save_steps": 1000, "precision": "fp32", "report_to": [], "dataloader_num_workers": 0,
        "output_dir": str(tmp_path / "run")}))
    return train(load_train_config(str(cfg_file)), callbacks=list(callbacks))


def test_one_sft_step_trains_adapters_and_projector_only(tmp_path):
    """train() (train.py's library) with init_from=<llava dir>, stage=sft, LoRA: after one step the vision tower
    and every base LM weight are bit-identical, the LoRA adapters and the projector changed, and the optimizer's
    groups carry the configured rates (projector_lr, learning_rate; no vision group)."""

    path = save_llava_qwen(tmp_path / "llava", with_vl_tokens=False)
    before = {k: v.clone() for k, v in VLM.from_pretrained(path).state_dict().items()}
    trainers = []
    result = _sft(tmp_path, path, callbacks=[lambda cfg, trainer, out: trainers.append(trainer) or []])
    after = result.model.state_dict()
    lora = [k for k in after if "lora_" in k]
    assert lora
    assert all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if "lora_B" in k)
    for k, v in after.items():
        if "lora_" in k:
            continue
        base = k.replace("base_model.model.", "").replace(".base_layer", "")
        if k.startswith("projector."):
            assert not torch.equal(v, before[base]), k
        else:
            assert torch.equal(v, before[base]), k  # towers and the LM's base weights: bit-identical
    groups = {g["name"]: g for g in trainers[0].optimizer.param_groups}
    assert not any(n.startswith("vision") for n in groups)
    assert {g["initial_lr"] for n, g in groups.items() if n.startswith("projector")} == {5e-3}
    assert {g["initial_lr"] for n, g in groups.items() if n.startswith("lm")} == {2e-3}
    lm_names = [p for name, g in groups.items() if name.startswith("lm") for p in g["param_names"]]
    assert lm_names and all("lora_" in p for p in lm_names)


def test_merged_export_loads_in_transformers_with_our_logits_and_answers(tmp_path):
    """After one sft step: model/merge.py then model/export.py; AutoModelForImageTextToText + AutoProcessor
    load the export, its processor's ids equal ours, logits within 1e-5, greedy answers equal generate's."""
    from qwenvl_lab.model.export import main as export_main
    from qwenvl_lab.model.merge import merge
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = save_llava_qwen(tmp_path / "llava", with_vl_tokens=False)
    run = _sft(tmp_path, path).output_dir
    ours = VLM.from_pretrained(run / "final").eval()
    merge(run / "final", tmp_path / "merged")
    assert export_main(["--src", str(tmp_path / "merged"), "--dst", str(tmp_path / "hf")]) == 0
    ref = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    prompt = processor.apply_chat_template(_processor_messages()[:1], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=prompt, images=_images(), return_tensors="pt")
    ids = ours.chat_ids(RECORD[:1], 2)
    assert ids == inputs["input_ids"][0].tolist()
    x = torch.tensor([ids])
    with torch.no_grad():
        want = ref(**inputs).logits
        got = ours(x, attention_mask=torch.ones_like(x), pixel_values=inputs["pixel_values"], image_counts=[2]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        theirs = ref.generate(**inputs, max_new_tokens=6, do_sample=False)[0, x.shape[1]:].tolist()
        mine = ours.generate(x, torch.ones_like(x), pixel_values=inputs["pixel_values"],
                             max_new_tokens=6, do_sample=False)[0]
    assert mine == theirs[:len(mine)] and len(mine) > 0


def test_unmerged_adapter_loads_with_peft_on_the_released_base(tmp_path):
    """export_peft_adapter: adapter_config.json + adapter_model.safetensors that PeftModel.from_pretrained
    loads onto the released LlavaForConditionalGeneration (our Qwen LM's fused c_attn adapter split into
    q/k/v), giving our logits within 1e-5 and the same greedy answer."""

    from peft import PeftModel
    from qwenvl_lab.model.export import export_peft_adapter
    from qwenvl_lab.model.export import main as export_main
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    path = save_llava_qwen(tmp_path / "llava", with_vl_tokens=False)
    ours = _sft(tmp_path, path).model.eval()
    out = export_peft_adapter(ours, tmp_path / "adapter")
    assert export_main(["--src", str(tmp_path / "run" / "final"), "--dst", str(tmp_path / "cli"),
                        "--format", "peft-adapter"]) == 0
    assert (tmp_path / "cli" / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors"
                                                                            ).read_bytes()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in names
    released = LlavaForConditionalGeneration.from_pretrained(str(path)).eval()
    _, inputs = _processor_inputs(path, _processor_messages()[:1], generation=True)
    x = inputs["input_ids"]
    assert x[0].tolist() == ours.chat_ids(RECORD[:1], 2)
    with torch.no_grad():
        plain = released(**inputs).logits
    ref = PeftModel.from_pretrained(released, str(out)).eval()  # wraps `released` in place
    with torch.no_grad():
        want = ref(**inputs).logits
        got = ours(x, attention_mask=torch.ones_like(x), pixel_values=inputs["pixel_values"]).logits
    assert (want - plain).abs().max() > 1e-4  # the adapter and the projector really changed the model
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        theirs = ref.generate(**inputs, max_new_tokens=6, do_sample=False)[0, x.shape[1]:].tolist()
        mine = ours.generate(x, torch.ones_like(x), pixel_values=inputs["pixel_values"], max_new_tokens=6,
                             do_sample=False)[0]
    assert mine == theirs[:len(mine)] and len(mine) > 0
