"""Idefics3 and SmolVLM through the released wrapper (model/families.py, model/released.py), against transformers.

Each family's tiny checkpoint is the released layout: `save_pretrained` of the transformers model (a tiny SigLIP
tower, pixel-shuffle connector and Llama LM built from Idefics3Config / SmolVLMConfig) and of its processor
(its image processor, a locally made tokenizer with the image tokens the processor needs, the published chat
template: chat_template.jinja for Idefics3, chat_template.json for SmolVLM), loaded back through AutoProcessor
and our loader. The two images (300x200 and 17x301, W x H) are split into 3x4 and 4x1 tiles plus the global image,
4 image tokens per tile (32 px tiles of 8 px patches, pixel shuffle 2).
Asserted per family:
- a 2-image LLaVA-format record read by our dataset renders to the processor's input_ids, and every token of
  every image span (tiles, row/col markers, fake tokens, <global-img>, the newlines between rows) is -100;
- our loss equals `model(**processor_inputs, labels=ours).loss` within 1e-5;
- labels equal the assistant mask of a `{% generation %}` template;
- per-sample logits in a padded batch (our collate: images padded per sample) equal the unpadded ones within 1e-6;
- one stage=sft step through train(): vision and base LM bit-identical, LoRA and connector moved, each at its rate;
- greedy `chat` (and `chat_batch`) equals transformers' generate on the processor's inputs.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from PIL import Image
from qwenvl_lab.core.errors import UserError
from qwenvl_lab.dataset.hf_chat import ReleasedDataset, released_collate
from qwenvl_lab.dataset.sample import Sample
from qwenvl_lab.model.families import FAMILIES, family_of
from qwenvl_lab.model.model import build_vlm, load_vlm
from qwenvl_lab.model.released import ReleasedVLM
from qwenvl_lab.qwen.convert import tiktoken_to_hf

from tests.released_stages import STAGE_CASES, generate_reply, trainable_parts
from tests.tiny_model import randomize_
from tests.tiny_qwen import _tiny_ranks

ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
            "<image>", "<global-img>", *ROW_COL]
# The published templates (Idefics3-8B-Llama3, SmolVLM-Instruct): "User:<image>...<end_of_utterance>\nAssistant: ..."
_BODY = ("{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}"
         "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
         "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
         "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
TEMPLATES = {"idefics3": "<|begin_of_text|>" + _BODY, "smolvlm": "<|im_start|>" + _BODY}
FAMILY_NAMES = ["idefics3", "smolvlm"]
SIZES = [(300, 200), (17, 301)]  # W x H: 3 rows x 4 cols and 4 rows x 1 col of 32 px tiles, each + global
CONVERSATIONS = [{"from": "human", "value": "<image>\n<image>\nWhat differs between them?"},
                 {"from": "gpt", "value": "The first is wide, the second tall."}]
HF_MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"},
                                 {"type": "text", "text": "\nWhat differs between them?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "The first is wide, the second tall."}]},
]

HF_TEXT = [{"role": "user", "content": "<image>\n<image>\nWhat differs between them?"},
           {"role": "assistant", "content": "The first is wide, the second tall."}]


def _images(seed: int = 0, sizes=SIZES) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes]


def _tokenizer(adds_bos: bool = False):
    """The tiny BPE with the processor's tokens; `adds_bos`: a post-processor puts BOS first, as Llama 3's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk = tiktoken_to_hf(_tiny_ranks(), SPECIALS)
    if adds_bos:
        bos = "<|begin_of_text|>"
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>",
                                   pad_token="<|end_of_text|>")


def _model(name: str, tok):
    import transformers

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[name]
    config = getattr(transformers, prefix + "Config")(vision_config=vision, text_config=text, scale_factor=2,
                                                      image_token_id=tok.convert_tokens_to_ids("<image>"))
    return getattr(transformers, prefix + "ForConditionalGeneration")(config)


def _processor(name: str, tok, template: str):
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[name]
    image_processor = getattr(transformers, prefix + "ImageProcessor")(size={"longest_edge": 128},
                                                                       max_image_size={"longest_edge": 32})
    parts = dict(image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=template)
    if name == "smolvlm":
        parts["video_processor"] = transformers.SmolVLMVideoProcessor()
    return getattr(transformers, prefix + "Processor")(**parts)


def write_released(path, name: str, template: str | None = None, adds_bos: bool = False):
    """A tiny released checkpoint of family `name` in its own layout (model, processor, chat template)."""
    tok = _tokenizer(adds_bos)
    model = _model(name, tok)
    randomize_(model, seed=2)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path))
    _processor(name, tok, template or TEMPLATES[name]).save_pretrained(str(path))
    if name == "smolvlm":  # the older layout: the template inside chat_template.json
        jinja = path / "chat_template.jinja"
        (path / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}))
        jinja.unlink()
    return path


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def released(request, tmp_path_factory):
    from transformers import AutoProcessor

    path = write_released(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, path, load_vlm(path), AutoProcessor.from_pretrained(str(path))


def _reference(processor, messages=HF_MESSAGES, images=None, **kw):
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(text=[text], images=images or _images(), return_tensors="pt", **kw)


def _record_dataset(model, tmp_path) -> ReleasedDataset:
    for i, img in enumerate(_images()):
        img.save(tmp_path / f"{'ab'[i]}.png")
    record = {"image": ["a.png", "b.png"], "conversations": CONVERSATIONS}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    return ReleasedDataset([str(tmp_path / "train.jsonl")], model.render, None, image_folder=str(tmp_path), strict=True)


def test_family_entries_and_lookup(released):
    name, path, model, processor = released
    assert isinstance(model, ReleasedVLM) and family_of(path) is FAMILIES[name]
    assert not FAMILIES[name].native and FAMILIES[name].serving.startswith("generate")
    assert processor.chat_template == TEMPLATES[name]  # read back from the released layout
    assert isinstance(build_vlm({"init_from": str(path)}), ReleasedVLM)
    with pytest.raises(UserError, match="^min_pixels: not a resolution key"):
        ReleasedVLM.from_pretrained(path, min_pixels=100)
    with pytest.raises(UserError, match="^max_image_size: .* image_size 32"):
        ReleasedVLM.from_pretrained(path, max_image_size=64)


def test_dataset_ids_equal_processor_and_spans_are_masked(released, tmp_path):
    _, _, model, processor = released
    item = _record_dataset(model, tmp_path)[0]
    ref = _reference(processor)
    assert item["input_ids"] == ref["input_ids"][0].tolist()
    assert torch.equal(item["pixel_values"], ref["pixel_values"])  # [1, 13 + 5 tiles, 3, 32, 32]
    assert item["pixel_values"].shape == (1, 18, 3, 32, 32)
    assert torch.equal(item["pixel_attention_mask"], ref["pixel_attention_mask"])
    tok = processor.tokenizer
    spans = [s.text for s in model.image_tokens(_images())]
    assert [s.count("<row_") for s in spans] == [12, 4] and all(s.count("<global-img>") == 1 for s in spans)
    counts = model.image_tokens(_images())
    assert counts == [13 * 4, 5 * 4]  # feature rows: image_seq_len per tile and global image
    assert [c.text for c in pickle.loads(pickle.dumps(counts))] == spans  # spans survive a worker boundary
    span_ids = [tok(s, add_special_tokens=False)["input_ids"] for s in spans]
    ids, labels = item["input_ids"], item["labels"]
    for span in span_ids:  # each span is a run of the ids, every label in it -100
        start = next(i for i in range(len(ids)) if ids[i:i + len(span)] == span)
        assert all(y == -100 for y in labels[start:start + len(span)])
    assert sum(t == tok.convert_tokens_to_ids("<image>") for t in ids) == 4 * 18
    assert tok.decode([y for y in labels if y != -100]) == " The first is wide, the second tall.<end_of_utterance>\n"


def test_span_inside_an_assistant_turn_is_masked_by_position(released):
    _, _, model, processor = released
    sample = Sample(id="a", images=["a.png"], messages=[{"role": "user", "content": "Draw it."},
                                                       {"role": "assistant", "content": "Here <image> done."}])
    ours = model.render(sample, _images()[:1])
    tok = processor.tokenizer
    span = tok(model.image_tokens(_images()[:1])[0].text, add_special_tokens=False)["input_ids"]
    ids, labels = ours["input_ids"], ours["labels"]
    start = next(i for i in range(len(ids)) if ids[i:i + len(span)] == span)
    assert tok.decode(span).count("\n") == 4  # the newlines between tile rows are span tokens too
    assert all(y == -100 for y in labels[start:start + len(span)])
    assert tok.decode([y for y in labels if y != -100]) == " Here  done.<end_of_utterance>\n"
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Draw it."}]}, {
        "role": "assistant", "content": [{"type": "text", "text": "Here "}, {"type": "image"},
                                         {"type": "text", "text": " done."}]}], tokenize=False)
    assert ids == processor(text=[text], images=_images()[:1], return_tensors="pt")["input_ids"][0].tolist()


def test_truncation_drops_whole_turns_with_their_images(released):
    _, _, model, processor = released
    two = Sample(id="t", images=["a.png", "b.png"], messages=[
        {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "Wide."},
        {"role": "user", "content": "<image>\nAnd this?"}, {"role": "assistant", "content": "Tall."}])
    full = model.render(two, _images())
    first = model.render(Sample(id="f", images=["a.png"], messages=two.messages[:2]), _images()[:1])
    cut = model.render(two, _images(), max_length=len(full["input_ids"]) - 1)
    assert cut["input_ids"] == first["input_ids"] and cut["labels"] == first["labels"]
    assert cut["pixel_values"].shape == (1, 13, 3, 32, 32)  # the first image's 12 tiles + global only
    assert torch.equal(cut["pixel_values"], first["pixel_values"])


def test_loss_equals_transformers(released, tmp_path):
    _, _, model, processor = released
    item = _record_dataset(model, tmp_path)[0]
    ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
    ref = _reference(processor)
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                     pixel_values=item["pixel_values"], pixel_attention_mask=item["pixel_attention_mask"]).loss
        hf = model.model(**ref, labels=labels).loss
    assert loss.item() > 0 and abs(loss.item() - hf.item()) < 1e-5


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_labels_equal_generation_template_mask(tmp_path, name):
    from transformers import AutoProcessor

    # The published template with the assistant turn in a generation block. Its reply prompt ends at "Assistant:",
    # so the space before the reply is generated too: the block starts right after the prompt (same text).
    user = _BODY[_BODY.index("{{message['role'] | capitalize}}"):_BODY.index("{% endfor %}{% if add_generation")]
    tagged = (TEMPLATES[name].removesuffix(_BODY) + "{% for message in messages %}{% if message['role'] == 'assistant' %}Assistant:"
              "{% generation %} {% for line in message['content'] %}{{line['text']}}{% endfor %}<end_of_utterance>\n"
              "{% endgeneration %}{% else %}" + user + "{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
    path = write_released(tmp_path / name, name, template=tagged)
    model, processor = load_vlm(path), AutoProcessor.from_pretrained(str(path))
    record = Sample(id="g", images=["a.png", "b.png"], messages=[
        {"role": "user", "content": "<image>\n<image>\nWhat differs between them?"},
        {"role": "assistant", "content": "The first is wide, the second tall."},
        {"role": "user", "content": "Which is taller?"},
        {"role": "assistant", "content": "The second."}])
    ours = model.render(record, _images())
    messages = HF_MESSAGES + [{"role": "user", "content": [{"type": "text", "text": "Which is taller?"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "The second."}]}]
    images = iter(_images())
    messages = [{**m, "content": [{**p, "image": next(images)} if p["type"] == "image" else p for p in m["content"]]}
                for m in messages]
    published = processor.apply_chat_template(messages, tokenize=False, chat_template=TEMPLATES[name])
    assert processor.apply_chat_template(messages, tokenize=False) == published  # the same text, only tagged
    ref = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ours["input_ids"] == list(ref["input_ids"][0])
    mask = [bool(m) for m in ref["assistant_masks"][0]]
    assert sum(mask) > 0 and [y != -100 for y in ours["labels"]] == mask


def test_a_tokenizer_that_adds_bos_gets_it_once(tmp_path):
    from transformers import AutoProcessor

    path = write_released(tmp_path / "bos", "idefics3", adds_bos=True)
    model, processor = load_vlm(path), AutoProcessor.from_pretrained(str(path))
    bos = processor.tokenizer.bos_token_id
    assert processor.tokenizer("Hi")["input_ids"][0] == bos  # the tokenizer adds it; the template writes it too
    ours = model.render(Sample(id="b", images=["a.png", "b.png"], messages=HF_TEXT), _images())
    images = iter(_images())
    messages = [{**m, "content": [{**p, "image": next(images)} if p["type"] == "image" else p for p in m["content"]]}
                for m in HF_MESSAGES]
    ref = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ours["input_ids"] == list(ref["input_ids"][0]) and ours["input_ids"].count(bos) == 1
    assert ours["labels"][0] == -100
    prompt = model.chat_ids([{"role": "user", "content": "Hi"}], 0, [])
    assert prompt[0] == bos and prompt.count(bos) == 1


def test_padded_batch_logits_equal_unpadded(released):
    # float64: the check is about padding (masks, per-sample image padding), not fp32 GEMM rounding
    model = copy.deepcopy(released[2]).double()
    short = Sample(id="s", images=["c.png"], messages=[{"role": "user", "content": "<image>\nWhat is it?"},
                                                       {"role": "assistant", "content": "A square."}])
    rows = [model.render(Sample(id="r", images=["a.png", "b.png"], messages=HF_TEXT), _images()),
            model.render(short, _images(1, [(40, 40)])),
            model.render(Sample(id="t", messages=[{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello."}]), [])]
    batch = released_collate(model.pad_token_id, FAMILIES[released[0]].per_sample_inputs)(rows)
    assert batch["pixel_values"].shape == (3, 18, 3, 32, 32) and batch["pixel_values"][2].abs().sum() == 0
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"].double(),
                       pixel_attention_mask=batch["pixel_attention_mask"]).logits
        for i, r in enumerate(rows):
            one = torch.tensor([r["input_ids"]])
            image_kw = {k: v.double() if v.is_floating_point() else v for k, v in r.items() if torch.is_tensor(v)}
            alone = model(input_ids=one, attention_mask=torch.ones_like(one), **image_kw).logits[0]
            assert (logits[i, : len(r["input_ids"])] - alone).abs().max().item() < 1e-6


def test_greedy_chat_equals_transformers_generate(released):
    _, _, model, processor = released
    messages = [{"role": "user", "content": "<image> and <image>: which is wider?"}]
    reply = model.chat(_images(), messages, max_new_tokens=8)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " and "},
                                                {"type": "image"}, {"type": "text", "text": ": which is wider?"}]}]
    text = processor.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    ref = processor(text=[text], images=_images(), return_tensors="pt")
    assert model.chat_ids(messages, 2, model.image_tokens(_images())) == ref["input_ids"][0].tolist()
    assert reply == generate_reply(model, ref, 8)


def test_an_empty_message_renders_as_the_template_writes_it(released):
    _, _, model, processor = released
    ids = model.chat_ids([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], 0, [])
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                          {"role": "assistant", "content": [{"type": "text", "text": ""}]}],
                                         tokenize=False, add_generation_prompt=True)
    assert "Assistant: <end_of_utterance>" in text  # the template reads content[0]: an empty part, not none
    assert ids == processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_batch_equals_chat_alone(released):
    model = released[2]
    convs = [(_images(), [{"role": "user", "content": "<image> and <image>: which is wider?"}]),
             (_images(1, [(40, 40)]), [{"role": "user", "content": "Describe."}]),  # no marker: the image goes first
             ([], [{"role": "user", "content": "Say hi."}])]
    assert model.chat_batch(convs, max_new_tokens=6) == [model.chat(i, m, max_new_tokens=6) for i, m in convs]


def test_resolution_keys_reach_the_processor(released):
    _, path, _, processor = released
    small = ReleasedVLM.from_pretrained(path, size=64, do_image_splitting=True)  # an int: {"longest_edge": 64}
    ids = small.chat_ids([{"role": "user", "content": "<image>\n<image>\nQ"}], 2, small.image_tokens(_images()))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"},
                                             {"type": "text", "text": "\nQ"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = processor(text=[text], images=_images(), return_tensors="pt", size={"longest_edge": 64})
    assert ids == ref["input_ids"][0].tolist()
    assert small.image_inputs(_images())["pixel_values"].shape[1] == 2 * 2 + 1 + 2 * 1 + 1  # 2x2 and 2x1 tiles
    whole = ReleasedVLM.from_pretrained(path, do_image_splitting=False)
    assert [s.text.count("<row_") for s in whole.image_tokens(_images())] == [0, 0]


# ----- stages: what trains, at which rate ---------------------------------------------------------------
@pytest.mark.parametrize("stage,vision_lr,want", STAGE_CASES)
def test_stages_train_the_family_parts(released, stage, vision_lr, want):
    from qwenvl_lab.model.stages import apply_lora, set_trainable
    from qwenvl_lab.model.train_config import LoraSettings

    name, path, _, _ = released
    model = ReleasedVLM.from_pretrained(path)
    if stage == "sft":
        apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))  # no targets: the family's LM linears
        adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
        assert len(adapted) == 14 and all(".text_model." in n for n in adapted)  # 7 linears x 2 layers, no tower
        assert {n.rsplit(".", 1)[1] for n in adapted} == set(FAMILIES[name].notes["lora_targets"].split("|"))
    set_trainable(model, stage, vision_lr)
    assert trainable_parts(model) == want
    towers = {id(p) for p in model.towers.parameters()}
    assert towers == {id(p) for n, p in model.named_parameters() if ".vision_model." in n or ".connector." in n}


def test_one_sft_step_through_train(released, tmp_path):
    from peft import PeftModel
    from qwenvl_lab.trainer.run import train

    from tests.tiny_train import tiny_train_config

    name, path, _, _ = released
    _record_dataset(released[2], tmp_path)
    (tmp_path / "train.jsonl").write_text((tmp_path / "train.jsonl").read_text() * 2)
    cfg = tiny_train_config(tmp_path, tmp_path, model=None, init_from=str(path), stage="sft", max_steps=1,
                            per_device_train_batch_size=2, learning_rate=1e-3, projector_lr=2e-3, vision_lr=0.0,
                            lora={"r": 4, "alpha": 8, "dropout": 0.0}, max_length=400, weight_decay=0.0,
                            gradient_checkpointing=True)  # as the recipes: adapters must still get gradients
    result = train(cfg)
    base = dict(ReleasedVLM.from_pretrained(path).named_parameters())
    trained = {n.removeprefix("model.").removeprefix("base_model.model."): p for n, p in result.model.named_parameters()}
    moved = {"connector": 0, "lora_B": 0}
    for n, p in trained.items():
        if "lora_" in n:
            if "lora_B" in n:  # lora_B starts at 0: Adam's first step moves each entry by lr
                assert torch.allclose(p.abs().max(), torch.tensor(1e-3), rtol=0.05), n
                moved["lora_B"] += 1
            continue
        hf = "model." + n.replace(".base_layer.", ".")
        if ".connector." in n:  # the projector moved by its own rate
            step = (p.detach() - base[hf]).abs()
            assert torch.allclose(step[step > 0].median(), torch.tensor(2e-3), rtol=0.05), n
            moved["connector"] += 1
        else:  # vision and base LM weights untouched
            assert torch.equal(p.detach(), base[hf].detach()), n
    assert moved == {"connector": 1, "lora_B": 14}
    final = load_vlm(tmp_path / "run")  # the run's final/: the released base + adapter + connector
    assert isinstance(final, ReleasedVLM) and final.family is FAMILIES[name]
    for n, p in final.named_parameters():
        assert torch.equal(p, dict(result.model.named_parameters())[n]), n
    lora_dir = next((tmp_path / "run").glob("**/lora/adapter_config.json")).parent
    peft = PeftModel.from_pretrained(ReleasedVLM.from_pretrained(path).model, str(lora_dir))  # PEFT's own format
    loaded = dict(peft.named_parameters())
    ours = {n.removeprefix("model."): p for n, p in result.model.named_parameters() if "lora_" in n}
    assert len(ours) == 28 and all(torch.equal(loaded[n], p) for n, p in ours.items())


@pytest.fixture(scope="module")
def trained(released, tmp_path_factory):
    """A run's trainable-only save (LoRA adapters given values, connector) on the released checkpoint."""
    from qwenvl_lab.model.stages import apply_lora
    from qwenvl_lab.model.train_config import LoraSettings

    model = ReleasedVLM.from_pretrained(released[1])
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n or ".connector." in n)
            if "lora_B" in n or ".connector." in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("trained")
    model.save_pretrained(out, trainable_only=True)
    return out, model.eval()


def test_test_py_answers_with_a_trained_run(released, trained, tmp_path, capsys):
    from tests.tiny_server import answer_of_test_py

    path, model = trained
    _images()[0].save(tmp_path / "a.png")
    answer = answer_of_test_py(["--model", str(path), "--image", str(tmp_path / "a.png"), "--prompt", "What is it?",
                                "--max-new-tokens", "5"], capsys)
    messages = [{"role": "user", "content": "What is it?"}]
    base = ReleasedVLM.from_pretrained(released[1]).chat(_images()[:1], messages, max_new_tokens=5)
    assert answer == model.chat(_images()[:1], messages, max_new_tokens=5)
    assert answer != base  # the adapters and connector were loaded, not only the base


def test_merged_output_loads_with_transformers_auto_classes(released, trained, tmp_path):
    from qwenvl_lab.model.merge import main as merge_main
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path, model = trained
    assert merge_main(["--src", str(path), "--dst", str(tmp_path / "merged")]) == 0
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "merged"))
    assert type(hf).__name__ == FAMILIES[released[0]].hf_class and processor.chat_template == TEMPLATES[released[0]]
    assert not any("lora_" in n for n, _ in hf.named_parameters())
    ref = _reference(processor)
    with torch.no_grad():
        ours = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], pixel_values=ref["pixel_values"],
                     pixel_attention_mask=ref["pixel_attention_mask"]).logits
        theirs = hf(**ref).logits
        base = ReleasedVLM.from_pretrained(released[1]).model(**ref).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - base).abs().max().item() > 1e-3  # the merge carried the training


@pytest.mark.parametrize("key,value", [("packing", True), ("feature_cache", "cache_dir"), ("fused_impl", "torch")])
def test_features_that_cannot_apply_are_refused(released, tmp_path, key, value):
    from qwenvl_lab.core.config_io import ConfigError
    from qwenvl_lab.trainer.run import build_model

    from tests.tiny_train import tiny_train_config

    (tmp_path / "train.jsonl").write_text("{}\n")
    cfg = tiny_train_config(tmp_path, tmp_path, model=None, init_from=str(released[1]), stage="sft",
                            lora={"r": 4}, **{key: value})
    with pytest.raises(ConfigError, match=f"^{key}: not available for the released family {released[0]} "):
        build_model(cfg)


def test_a_processor_that_cannot_load_is_one_line(released, monkeypatch, capsys):
    from qwenvl_lab.core.cli import run_cli
    from qwenvl_lab.model import released as released_module

    from tests.tiny_server import entry

    def missing(*args, **kwargs):
        raise ImportError("Package `num2words` is required to run SmolVLM processor.")

    monkeypatch.setattr(released_module, "AutoProcessor", type("NoProcessor", (), {"from_pretrained": missing}))
    capsys.readouterr()
    assert run_cli(entry("test").main, ["--model", str(released[1]), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Loading weights" not in err  # refused before the weights are read
    assert err.strip().startswith(f"error: {released[1]}: its processor cannot load: Package `num2words`")


def test_evaluation_cli_answers_with_a_trained_run(trained, tmp_path, capsys):
    from qwenvl_lab.evaluation.__main__ import main as evaluate
    from qwenvl_lab.evaluation.runner import read_answers, run_task

    from tests import tiny_bench

    path, model = trained
    root, images = tiny_bench.write_vqav2(tmp_path / "vqav2")
    assert evaluate(["--model", str(path), "--task", "vqav2", "--data", str(root), "--images", str(images),
                     "--max-new-tokens", "4", "--batch-size", "3", "--output", str(tmp_path / "a")]) == 0
    assert "vqav2: 3 scored of 3" in capsys.readouterr().out
    run_task(model, "vqav2", str(root), images=str(images), output=tmp_path / "b", batch_size=1, max_new_tokens=4,
             progress=False)  # the trained model in memory, one question at a time
    answers = read_answers(tmp_path / "a" / "answers.jsonl")
    assert len(answers) == 3 and any(answers.values())
    assert answers == read_answers(tmp_path / "b" / "answers.jsonl")
