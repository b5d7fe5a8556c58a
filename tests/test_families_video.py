"""LLaVA-OneVision and LLaVA-NeXT-Video through the released wrapper (model/released.py), against transformers.

Tiny checkpoints in the released layout (tests/tiny_llava_video.py), loaded through `load_vlm` as a user's are.
Asserted:
- OneVision: a 2-image LLaVA-format record renders to the processor's input_ids (its images as one sample:
  base view + newline each, `batch_num_images` [2]); one large image alone takes the anyres_max_9 path (its
  grid bilinearly downscaled: fewer tokens than with anyres_max_100), ids equal the processor's too;
- NeXT-Video: a video record (a video file on disk, frames from our frame sampler) renders its `<video>` span
  as the processor does (pooled frame rows), and a 2-image record as LLaVA-NeXT; the tokenizer's `<s>` leads;
- each: loss equals `model(**processor_inputs, labels=ours).loss` within 1e-5; every image / video span token
  is -100 and the labels are the assistant turns (the template's `{% generation %}` mask plus its end of turn);
- per-sample logits of a right-padded batch equal the unpadded ones within 1e-6;
- one `stage=sft` step: vision tower and base LM bit-identical, LoRA and projector moved at their own rates;
  through train.py's `train()` a data file mixing a video record and a 2-image record trains;
- greedy `chat` (images, or a video) equals transformers' generate on the processor's inputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from qwenvl_lab.dataset.formats import normalize
from qwenvl_lab.dataset.hf_chat import released_collate, stack_image_inputs
from qwenvl_lab.dataset.images import load_video_frames
from qwenvl_lab.dataset.sample import BadSampleError, Sample
from qwenvl_lab.model.families import FAMILIES, family_of
from qwenvl_lab.model.model import build_vlm, load_vlm
from qwenvl_lab.model.released import ReleasedVLM

from tests.released_stages import STAGE_CASES, assert_first_adam_step, generate_reply, trainable_parts
from tests.tiny_data import write_video
from tests.tiny_llava_video import save_next_video, save_onevision

FRAMES = 4
RECORD = {"id": "r0", "image": ["a.png", "b.png"], "conversations": [
    {"from": "human", "value": "<image>\nWhat is in the first picture?"}, {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "And here <image> what?"}, {"from": "gpt", "value": "A blue circle, small."}]}
VIDEO_RECORD = {"id": "v0", "video": "v.mp4", "conversations": [
    {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "It gets brighter."},
    {"from": "human", "value": "How fast?"}, {"from": "gpt", "value": "Slowly."}]}


def _images(seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(40, 30), (30, 50)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes]


def _hf_messages(sample: Sample) -> list[dict]:
    from qwenvl_lab.dataset.hf_chat import hf_messages

    return hf_messages(sample)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The data folder: two images and a small video (48 x 32, frames of rising gray) on disk."""
    root = tmp_path_factory.mktemp("media")
    for name, img in zip(("a.png", "b.png"), _images()):
        img.save(root / name)
    write_video(root / "v.mp4", n_frames=10, size=(48, 32))
    return root


@pytest.fixture(scope="module", params=["llava_onevision", "llava_next_video"])
def released(request, tmp_path_factory):
    from transformers import AutoProcessor

    save = save_onevision if request.param == "llava_onevision" else save_next_video
    path = save(tmp_path_factory.mktemp(request.param) / "ckpt")
    return request.param, path, load_vlm(path), AutoProcessor.from_pretrained(str(path))


def _sample(record: dict, media) -> Sample:
    return normalize(record, 0, str(media / "data.jsonl"), image_folder=str(media), video_folder=str(media))


def _video_frames(media) -> list[Image.Image]:
    return load_video_frames(str(media / "v.mp4"), FRAMES)  # our frame sampler


def _reference(processor, sample: Sample, images=None, videos=None, nested=False):
    text = processor.apply_chat_template(_hf_messages(sample), tokenize=False)
    kw = {}
    if images:
        kw["images"] = [images] if nested else images
    if videos:
        kw["videos"] = videos
    return processor(text=[text], return_tensors="pt", **kw)


def _assistant_text(processor, labels) -> str:
    return processor.tokenizer.decode([y for y in labels if y != -100])


def _loss_pair(model, ours: dict, ref) -> tuple[float, float]:
    ids, labels = torch.tensor([ours["input_ids"]]), torch.tensor([ours["labels"]])
    inputs = {k: v for k, v in ours.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **inputs).loss
        hf = model.model(**ref, labels=labels).loss
    return loss.item(), hf.item()


def test_family_entries_and_lookup(released):
    name, path, model, _ = released
    family = FAMILIES[name]
    assert isinstance(model, ReleasedVLM) and family_of(path) is family and not family.native and family.video
    assert isinstance(build_vlm({"init_from": str(path)}), ReleasedVLM)
    assert model.towers is model.model.model.vision_tower
    assert model.video_token_id == model.processor.tokenizer.convert_tokens_to_ids("<video>")


def test_onevision_two_images_ids_loss_and_masks(released, media):
    name, _, model, processor = released
    if name != "llava_onevision":
        pytest.skip("OneVision's multi-image rule")
    sample = _sample(RECORD, media)
    ours = model.render(sample, _images())
    ref = _reference(processor, sample, _images(), nested=True)
    assert ours["input_ids"] == ref["input_ids"][0].tolist()
    assert ours["batch_num_images"].tolist() == [2] and torch.equal(ours["pixel_values"], ref["pixel_values"])
    image_id = model.image_token_id
    # several images in one sample: each its base view (4 x 4 rows) + one newline, never its anyres tiles
    assert ours["input_ids"].count(image_id) == 2 * (16 + 1)
    assert all(y == -100 for t, y in zip(ours["input_ids"], ours["labels"]) if t == image_id)
    assert _assistant_text(processor, ours["labels"]) == "A red square.<|im_end|>\nA blue circle, small.<|im_end|>\n"
    loss, hf = _loss_pair(model, ours, ref)
    assert abs(loss - hf) < 1e-5


def test_onevision_one_large_image_is_downscaled_by_anyres_max_9(released, media):
    name, path, model, processor = released
    if name != "llava_onevision":
        pytest.skip("OneVision's anyres_max rule")
    big = Image.fromarray((torch.rand(100, 120, 3, generator=torch.Generator().manual_seed(3)) * 255)
                          .to(torch.uint8).numpy())
    sample = Sample(id="big", images=["big.png"], messages=[{"role": "user", "content": "<image>\nDescribe."},
                                                            {"role": "assistant", "content": "Noise."}])
    ours = model.render(sample, [big])
    ref = _reference(processor, sample, [big], nested=True)
    assert ours["input_ids"] == ref["input_ids"][0].tolist()
    n = ours["input_ids"].count(model.image_token_id)
    unbounded = copy.deepcopy(processor)
    unbounded.vision_aspect_ratio = "anyres_max_100"  # the same image without the downscale
    assert n < _reference(unbounded, sample, [big], nested=True)["input_ids"][0].tolist().count(model.image_token_id)
    assert ours["pixel_values"].shape[1] > 1  # base view + tiles
    loss, hf = _loss_pair(model, ours, ref)
    assert abs(loss - hf) < 1e-5


def test_video_record_ids_loss_and_masks(released, media):
    name, _, model, processor = released
    sample = _sample(VIDEO_RECORD, media)
    assert sample.videos and not sample.images
    frames = _video_frames(media)
    ours = model.render(sample, [], videos=[frames])
    ref = _reference(processor, sample, videos=[frames])
    assert ours["input_ids"] == ref["input_ids"][0].tolist()
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    video_id = model.video_token_id
    # each frame's 4 x 4 patch rows pooled to 2 x 2 (NeXT-Video: average pool, stride 2; OneVision: bilinear
    # to ceil(4 / 2)), OneVision adds one newline row per video
    assert ours["input_ids"].count(video_id) == FRAMES * 4 + (name == "llava_onevision")
    assert all(y == -100 for t, y in zip(ours["input_ids"], ours["labels"]) if t == video_id)
    if name == "llava_next_video":
        assert ours["input_ids"][0] == processor.tokenizer.bos_token_id  # the tokenizer's <s>, as the processor's
        # Tokenized whole (as the processor does), the reply's last space and the next "USER" are one token
        # " USER" (tests/tiny_llava_video.py BOUNDARY_MERGES): it overlaps the reply, so it is a target
        # (transformers' assistant-mask rule).
        assert _assistant_text(processor, ours["labels"]) == " It gets brighter. USER Slowly. "
    else:
        assert _assistant_text(processor, ours["labels"]) == "It gets brighter.<|im_end|>\nSlowly.<|im_end|>\n"
    loss, hf = _loss_pair(model, ours, ref)
    assert abs(loss - hf) < 1e-5


def test_next_video_two_images_ids_and_loss(released, media):
    name, _, model, processor = released
    if name != "llava_next_video":
        pytest.skip("NeXT-Video's image span")
    sample = _sample(RECORD, media)
    ours = model.render(sample, _images())
    ref = _reference(processor, sample, _images())
    assert ours["input_ids"] == ref["input_ids"][0].tolist()
    assert torch.equal(ours["image_sizes"], ref["image_sizes"])
    assert all(y == -100 for t, y in zip(ours["input_ids"], ours["labels"]) if t == model.image_token_id)
    loss, hf = _loss_pair(model, ours, ref)
    assert abs(loss - hf) < 1e-5


def test_truncation_drops_whole_turns_and_recounts_what_stays(released, media):
    """A sample over max_length loses its last (user, assistant) pair with the image it held; OneVision's
    remaining image is then alone in its sample: counted and packed by the single-image anyres rule."""
    name, _, model, processor = released
    sample = _sample(RECORD, media)
    first = Sample(id="r0", images=sample.images[:1], messages=sample.messages[:2])
    ref = _reference(processor, first, _images()[:1], nested=name == "llava_onevision")
    want = ref["input_ids"][0].tolist()
    assert len(model.render(sample, _images())["input_ids"]) > len(want)
    ours = model.render(sample, _images(), max_length=len(want))
    assert ours["input_ids"] == want and torch.equal(ours["pixel_values"], ref["pixel_values"])
    assert ours["image_sizes"].shape[0] == 1
    if name == "llava_onevision":
        assert ours["batch_num_images"].tolist() == [1] and ours["pixel_values"].shape[1] > 1  # base + tiles
    with pytest.raises(BadSampleError, match="longer than max_length"):
        model.render(sample, _images(), max_length=len(want) - 1)


def test_a_family_without_videos_refuses_a_video_sample_in_one_line(media):
    from qwenvl_lab.dataset.hf_chat import ReleasedDataset

    (media / "mixed.jsonl").write_text(json.dumps(VIDEO_RECORD) + "\n" + json.dumps(RECORD) + "\n")

    def render(sample, images, max_length, videos=None):
        return {"input_ids": [1, 2], "labels": [-100, 2]}

    ds = ReleasedDataset([str(media / "mixed.jsonl")], render, None, image_folder=str(media), frames_per_video=None)
    assert ds[0]["id"] == "r0"  # the video sample is skipped, the next one served
    report = ds.skip_report()
    assert report["by_kind"] == {"bad_video": 1} and "videos are not supported" in report["examples"][0]
    assert "mixed.jsonl" in report["examples"][0]
    with_videos = ReleasedDataset([str(media / "mixed.jsonl")], render, None, image_folder=str(media),
                                  frames_per_video=FRAMES)
    assert with_videos[0]["id"] == "v0" and with_videos.skip_report()["skipped"] == 0


def test_labels_are_the_generation_mask_plus_end_of_turn(released, media):
    """The published templates mark the assistant text with {% generation %}; our labels are that mask plus
    what lies between the generation prompt and the turn's end outside it (OneVision's end of turn; Vicuna's
    space after 'ASSISTANT:')."""
    name, _, model, processor = released
    sample = _sample(RECORD, media)
    ours = model.render(sample, _images())
    images = iter(_images())
    messages = [{**m, "content": [{**p, "image": next(images)} if p["type"] == "image" else p for p in m["content"]]}
                for m in _hf_messages(sample)]
    ref = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = [int(t) for t in ref["input_ids"][0]]
    assert ours["input_ids"] == ids  # with the tokenizer's <s> first for NeXT-Video's Vicuna tokenizer
    mask = [bool(m) for m in ref["assistant_masks"][0]]
    labelled = [y != -100 for y in ours["labels"]]
    extra = [t for t, lab, m in zip(ids, labelled, mask) if lab and not m]
    assert all(lab for lab, m in zip(labelled, mask) if m)  # every generation token is a target
    # OneVision: its end of turn. Vicuna: the space after "ASSISTANT:" of each turn, which the template's
    # generation prompt ("ASSISTANT:") leaves for the model to write, so it is the reply's first target.
    want_extra = "<|im_end|>\n" * 2 if name == "llava_onevision" else "  "
    assert processor.tokenizer.decode(extra) == want_extra


def _batch_rows(name, model, media) -> list[dict]:
    short = Sample(id="s", images=["a.png"], messages=[{"role": "user", "content": "<image>\nWhat is it?"},
                                                       {"role": "assistant", "content": "A square."}])
    rows = [model.render(_sample(RECORD, media), _images()), model.render(short, _images(1)[:1])]
    if name == "llava_next_video":
        rows.append(model.render(_sample(VIDEO_RECORD, media), [], videos=[_video_frames(media)]))
    return rows


def test_padded_batch_logits_equal_unpadded(released, media):
    # float64: the check is about padding (masks, positions, the crops' padding), not fp32 GEMM rounding
    name, _, model, _ = released
    model = copy.deepcopy(model).double()
    rows = _batch_rows(name, model, media)
    width = max(len(r["input_ids"]) for r in rows)
    pad = model.pad_token_id
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])  # [B, T]
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])

    def inputs(parts):
        return {k: v.double() if v.is_floating_point() else v for k, v in stack_image_inputs(parts).items()}

    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, **inputs(rows)).logits
        for i, r in enumerate(rows):
            one = torch.tensor([r["input_ids"]])
            alone = model(input_ids=one, attention_mask=torch.ones_like(one), **inputs([r])).logits[0]
            assert (batch[i, : len(r["input_ids"])] - alone).abs().max().item() < 1e-6


def test_one_sft_step_moves_only_adapters_and_projector_at_their_rates(released, media):
    from qwenvl_lab.model.stages import apply_lora, part_of, set_trainable
    from qwenvl_lab.model.train_config import LoraSettings
    from qwenvl_lab.trainer.optim import param_groups

    name, path, _, _ = released
    model = ReleasedVLM.from_pretrained(path)
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))  # no targets: the family's LM linears
    set_trainable(model, "sft")
    trainable = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lm", "projector"}
    assert any(n.endswith("image_newline") and p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():  # lora_B starts at 0: give it a value so lora_A gets a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = param_groups(model, learning_rate=1e-3, projector_lr=2e-3, vision_lr=0.0, weight_decay=0.0)
    assert {g["name"].removesuffix("_no_decay"): g["lr"] for g in groups} == {"lm": 1e-3, "projector": 2e-3}
    rows = [model.render(_sample(RECORD, media), _images())]
    if name == "llava_next_video":  # a video row too (its image_newline is used by the image row only)
        rows.append(model.render(_sample(VIDEO_RECORD, media), [], videos=[_video_frames(media)]))
    batch = released_collate(model.pad_token_id)(rows)
    assert name != "llava_next_video" or {"pixel_values", "pixel_values_videos"} <= set(batch)
    model(**batch).loss.backward()
    torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-12).step()
    assert_first_adam_step(groups, model, before)  # vision tower and base LM bit-identical


def test_greedy_chat_equals_transformers_generate(released, media):
    name, _, model, processor = released
    if name == "llava_onevision":
        messages = [{"role": "user", "content": "<image> and <image>: which is red?"}]
        images, videos = _images(), []
    else:
        messages = [{"role": "user", "content": "<video>\nWhat happens?"}]
        images, videos = [], [_video_frames(media)]
    reply = model.chat(images, messages, videos=videos, max_new_tokens=8)
    sample = Sample(id="c", messages=messages, images=["x"] * len(images), videos=["v"] * len(videos))
    text = processor.apply_chat_template(_hf_messages(sample), tokenize=False, add_generation_prompt=True)
    kw = {"images": [images]} if images else {"videos": videos}
    ref = processor(text=[text], return_tensors="pt", **kw)
    counts = model._media(images, videos)
    assert model.chat_ids(messages, len(images), counts[0], counts[1]) == ref["input_ids"][0].tolist()
    assert reply == generate_reply(model, ref, 8)


def test_chat_batch_equals_chat_alone(released, media):
    name, _, model, _ = released
    convs = [(_images(), [{"role": "user", "content": "<image> and <image>: which is red?"}]),
             (_images(1)[:1], [{"role": "user", "content": "Describe."}])]  # one image: OneVision's anyres path
    if name == "llava_next_video":
        convs.append(([], [{"role": "user", "content": "<video>\nWhat happens?"}], [_video_frames(media)]))
    assert model.chat_batch(convs, max_new_tokens=5) == [model.chat(c[0], c[1], *(c[2:] or [None]), max_new_tokens=5)
                                                         for c in convs]


def test_one_sft_step_through_train_with_a_video_record(released, media, tmp_path):
    from qwenvl_lab.trainer.run import train

    from tests.tiny_train import tiny_train_config

    name, path, _, _ = released
    if name != "llava_next_video":  # OneVision's batches (crops padded, batch_num_images) are checked above
        pytest.skip("the train() run is NeXT-Video's: a video record and a 2-image record in one batch")
    records = [RECORD, VIDEO_RECORD]
    (media / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = tiny_train_config(tmp_path, media, model=None, init_from=str(path), stage="sft", max_steps=1,
                            data_path=[str(media / f"{name}.jsonl")], image_folder=str(media),
                            per_device_train_batch_size=2, learning_rate=1e-3, projector_lr=2e-3, vision_lr=0.0,
                            lora={"r": 4, "alpha": 8, "dropout": 0.0}, max_length=1024, weight_decay=0.0,
                            frames_per_video=FRAMES)
    result = train(cfg)
    assert result.skipped == 0  # the video record trained, it was not skipped
    base = dict(ReleasedVLM.from_pretrained(path).named_parameters())
    for n, p in result.model.named_parameters():
        if "lora_" in n:
            continue
        key = "model." + n.removeprefix("model.").removeprefix("base_model.model.").replace(".base_layer.", ".")
        if ".multi_modal_projector." in n or n.endswith("image_newline"):  # moved by the projector's rate
            step = (p.detach() - base[key]).abs()
            assert torch.allclose(step[step > 0].median(), torch.tensor(2e-3), rtol=0.05), n
        else:  # vision and base LM untouched
            assert torch.equal(p.detach(), base[key].detach()), n
    final = load_vlm(tmp_path / "run")  # the released base + adapter + projector
    assert isinstance(final, ReleasedVLM)
    trained = dict(result.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in final.named_parameters())


def test_adapter_merge_and_test_py_after_an_sft_step(released, media, tmp_path, capsys):
    """The trained adapter in PEFT's format goes on the released base; merged, the model is a plain released
    checkpoint (AutoModelForImageTextToText + AutoProcessor, logits within 1e-5); test.py answers with it."""
    from peft import PeftModel
    from qwenvl_lab.model.merge import merge
    from qwenvl_lab.model.stages import apply_lora, set_trainable
    from qwenvl_lab.model.train_config import LoraSettings
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.tiny_server import answer_of_test_py

    name, path, _, _ = released
    model = ReleasedVLM.from_pretrained(path)
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    set_trainable(model, "sft")
    with torch.no_grad():  # a trained state: adapters and projector away from their initial values
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    model.save_pretrained(tmp_path / "run", trainable_only=True)
    row = model.render(_sample(RECORD, media), _images())
    ids = torch.tensor([row["input_ids"]])
    inputs = {k: v for k, v in row.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        ours = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits

    peft = PeftModel.from_pretrained(ReleasedVLM.from_pretrained(path).model, str(tmp_path / "run" / "lora"))
    ours_lora = {n.removeprefix("model."): p for n, p in model.named_parameters() if "lora_" in n}
    loaded = dict(peft.named_parameters())
    assert ours_lora and all(torch.equal(loaded[n], p) for n, p in ours_lora.items())

    merge(tmp_path / "run", tmp_path / "merged")
    assert not (tmp_path / "merged" / "lora").exists()
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "merged"))
    ref = _reference(processor, _sample(RECORD, media), _images(), nested=name == "llava_onevision")
    assert ref["input_ids"][0].tolist() == row["input_ids"]
    with torch.no_grad():
        theirs = hf(**ref).logits
    assert (ours - theirs).abs().max().item() < 1e-5

    _images()[0].save(tmp_path / "q.png")
    answer = answer_of_test_py(["--model", str(tmp_path / "run"), "--image", str(tmp_path / "q.png"),
                                "--prompt", "What is it?", "--max-new-tokens", "5"], capsys)
    assert answer == model.chat(_images()[:1], [{"role": "user", "content": "What is it?"}], max_new_tokens=5)


def test_evaluation_cli_and_likelihood_scoring(released, tmp_path, capsys):
    """The evaluation CLI answers a benchmark with the released checkpoint (batched answers equal one by one),
    and likelihood scoring (one forward over every option) equals teacher forcing option by option."""
    from qwenvl_lab.evaluation.__main__ import main as cli_main
    from qwenvl_lab.evaluation.likelihood import reply_logprobs
    from qwenvl_lab.evaluation.runner import read_answers, run_task

    from tests import tiny_bench as tb

    name, path, model, _ = released
    root, images = tb.write_vqav2(tmp_path / "vqav2")
    args = ["--model", str(path), "--task", "vqav2", "--data", str(root), "--images", str(images),
            "--max-new-tokens", "4", "--batch-size", "2", "--output", str(tmp_path / "a")]
    assert cli_main(args) == 0 and "vqav2: 3 scored of 3" in capsys.readouterr().out
    run_task(model, "vqav2", str(root), images=str(images), output=tmp_path / "b", batch_size=1, max_new_tokens=4,
             progress=False)
    assert read_answers(tmp_path / "a" / "answers.jsonl") == read_answers(tmp_path / "b" / "answers.jsonl")

    img = _images()[0]
    msgs = [{"role": "user", "content": "<image>\nWhich colour?\nA. red\nB. dark green"}]
    options = ["red", "dark green"]
    counts = model.image_tokens([img])
    base = model.chat_ids(msgs, 1, counts)
    for opt, (total, n, _) in zip(options, reply_logprobs(model, [img], msgs, options)):
        full = model.chat_ids(msgs + [{"role": "assistant", "content": opt}], 1, counts)
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(input_ids=ids, **model.image_inputs([img])).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        assert total == pytest.approx(sum(lp[p - 1, full[p]].item() for p in range(len(base), len(base) + n)),
                                      abs=1e-3)


def test_test_py_answers_about_a_video(released, media, capsys):
    from qwenvl_lab.core.cli import run_cli

    from tests.tiny_server import answer_of_test_py, entry

    name, path, model, _ = released
    answer = answer_of_test_py(["--model", str(path), "--video", str(media / "v.mp4"), "--frames", str(FRAMES),
                                "--prompt", "What happens?", "--max-new-tokens", "5"], capsys)
    frames = _video_frames(media)
    assert answer == model.chat([], [{"role": "user", "content": "<video>\nWhat happens?"}], videos=[frames],
                                max_new_tokens=5)
    # mistakes: one line, exit status 2, before or after the model loads
    module = entry("test")
    missing = ["--model", str(path), "--video", str(media / "nope.mp4"), "--prompt", "What happens?"]
    two = ["--model", str(path), "--video", str(media / "v.mp4"), "--prompt", "<video> or <video>?"]
    for argv, want in ((missing, "nope.mp4"), (two, "2 <video> marker(s) for 1 --video")):
        capsys.readouterr()
        assert run_cli(module.main, argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ") and want in err


def test_test_py_video_on_a_model_without_videos_is_one_line(media, tmp_path, capsys):
    from qwenvl_lab.core.cli import run_cli

    from tests.test_families_native import save_llava_qwen
    from tests.tiny_server import entry

    path = save_llava_qwen(tmp_path / "llava", with_vl_tokens=False)
    argv = ["--model", str(path), "--video", str(media / "v.mp4"), "--prompt", "What happens?"]
    capsys.readouterr()
    assert run_cli(entry("test").main, argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --video:") and "takes no videos" in line


@pytest.mark.parametrize("stage,vision_lr,want", STAGE_CASES)
def test_stages_train_the_family_parts(released, stage, vision_lr, want):
    from qwenvl_lab.model.stages import apply_lora, part_of, set_trainable
    from qwenvl_lab.model.train_config import LoraSettings

    name, path, _, _ = released
    model = ReleasedVLM.from_pretrained(path)
    if stage == "sft":
        apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))  # no targets: the family's LM linears
        adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
        assert adapted and all(".language_model." in n for n in adapted)
        assert {n.rsplit(".", 1)[1] for n in adapted} == set(FAMILIES[name].notes["lora_targets"].split("|"))
    set_trainable(model, stage, vision_lr)
    assert trainable_parts(model) == want
    newline = next(p for n, p in model.named_parameters() if n.endswith("image_newline"))
    assert part_of(next(n for n, p in model.named_parameters() if p is newline)) == "projector" and newline.requires_grad
