"""LM backbones: any transformers causal LM plugs in like a tower. Tiny Llama-3, Mistral, Gemma, Phi-3 and
SmolLM-style LMs (each with its own tokenizer and chat template, no image token) get a placeholder added,
render in their own template, take default LoRA targets, train through train.py, save, load and answer
through test.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from qwenvl_lab.dataset import Collator, load_image
from qwenvl_lab.dataset.rendering import render
from qwenvl_lab.dataset.sample import Sample
from qwenvl_lab.model import VLM, build_vlm
from qwenvl_lab.model.backbones import IMAGE_DELIMITERS, IMAGE_TOKEN
from qwenvl_lab.model.stages import apply_lora, resolve_lora_targets, set_trainable
from qwenvl_lab.model.train_config import LoraSettings
from qwenvl_lab.trainer.optim import param_groups

from tests.tiny_lms import FAMILIES, TEMPLATE_OF, write_tiny_family
from tests.tiny_model import tiny_tower_spec
from tests.tiny_server import answer_of_test_py, entry
from tests.tiny_train import TINY_TOWER, make_tiny_data, tiny_train_config

DEFAULT_TARGETS = {"llama3": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
                   "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}


def _vlm(tmp_path, family, **overrides):
    lm = write_tiny_family(tmp_path / f"lm_{family}", family)
    cfg = dict(lm=str(lm), lm_backend="hf", towers=[tiny_tower_spec(tmp_path, "clip")], image_mode="resize",
               projector="mlp2x_gelu", **overrides)
    return build_vlm(cfg)


def _batch(vlm, n_images=(1, 0, 2)):
    items = []
    for i, n in enumerate(n_images):
        conv = [{"role": "user", "content": "<image>" * n + f"question {i}?"},
                {"role": "assistant", "content": f"answer {i}"}]
        r = render(Sample(str(i), conv, images=[f"{k}.png" for k in range(n)]), vlm.chat_format,
                   vlm.tokens_per_image, image_token_id=vlm.image_token_id)
        px = vlm.image_processor([Image.new("RGB", (20, 20), (40 * k, 90, 10)) for k in range(n)]) if n else None
        items.append({"input_ids": torch.tensor(r.input_ids), "labels": torch.tensor(r.labels),
                      "pixel_values": px, "n_images": n, "id": str(i)})
    return dict(Collator(pad_id=vlm.pad_token_id)(items))


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_added_template_picked_and_a_batch_trains(tmp_path, family):
    vlm = _vlm(tmp_path, family)
    tok = vlm.tokenizer
    assert vlm.image_token_id == tok.token_to_id(IMAGE_TOKEN) == len(tok) - 1  # added past the vocabulary
    assert vlm.lm.get_input_embeddings().weight.shape[0] == len(tok)  # the table grew by one row
    assert vlm.backbone.added_tokens == [IMAGE_TOKEN] and vlm.token_rows is None  # its rows are never read
    assert vlm.chat_format.template.name == TEMPLATE_OF[family]
    vlm.train()
    out = vlm(**_batch(vlm))
    out.loss.backward()
    assert torch.isfinite(out.loss) and vlm.projector.mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama3", "phi3", "gemma"])
def test_default_lora_targets_follow_the_architecture(tmp_path, family):
    vlm = _vlm(tmp_path, family)
    apply_lora(vlm, LoraSettings(r=4))
    wrapped = {n.rsplit(".", 2)[-2] for n, _ in vlm.lm.named_modules() if n.endswith(".lora_A")}
    assert wrapped == DEFAULT_TARGETS.get(family, DEFAULT_TARGETS["llama3"])
    assert "lm_head" not in resolve_lora_targets(vlm, "all-linear")


def test_all_linear_covers_every_linear_but_the_head(tmp_path):
    vlm = _vlm(tmp_path, "mistral")
    apply_lora(vlm, LoraSettings(r=2, targets="all-linear"))
    linears = {n for n, m in vlm.lm.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in vlm.lm.named_modules() if n.endswith(".lora_A")}
    unwrapped = {n for n in linears if not n.endswith(".base_layer")}  # peft's base_layer sits inside a wrapper
    assert [n.rsplit(".", 1)[-1] for n in unwrapped] == ["lm_head"]  # every Linear but the head is wrapped
    assert not any(n.endswith("lm_head") for n in wrapped) and len(wrapped) == 2 * 7


def test_image_delimiters_are_added_and_their_rows_train_with_the_projector(tmp_path):
    vlm = _vlm(tmp_path, "llama3", image_delimiters=True)
    tok = vlm.tokenizer
    start, end = (tok.token_to_id(t) for t in IMAGE_DELIMITERS)
    fmt = vlm.chat_format
    assert (fmt.image_start_id, fmt.image_end_id) == (start, end)
    assert vlm.token_rows is not None and vlm.token_rows.ids.tolist() == [start, end]
    assert vlm.backbone.trainable_tokens == list(IMAGE_DELIMITERS)
    set_trainable(vlm, "align")
    groups = {g["name"]: g for g in param_groups(vlm, 1e-4, 1e-3, 0.0, 0.0)}
    assert "token_rows.weight" in groups["projector"]["param_names"] and groups["projector"]["lr"] == 1e-3
    vlm.train()
    batch = _batch(vlm, (1, 2))
    ids = batch["input_ids"][0].tolist()
    assert ids[ids.index(start) + 1 + vlm.tokens_per_image] == end  # start + N placeholders + end
    vlm(**batch).loss.backward()
    assert vlm.token_rows.weight.grad is not None and vlm.token_rows.weight.grad.abs().sum() > 0
    with torch.no_grad():
        vlm.token_rows.weight.add_(0.5)  # "trained" rows: they must survive a save/load round trip
    vlm.eval()
    vlm.save_pretrained(tmp_path / "saved", trainable_only=True)
    loaded = VLM.from_pretrained(tmp_path / "saved")
    assert loaded.backbone.added_tokens == [] and loaded.backbone.trainable_tokens == list(IMAGE_DELIMITERS)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, vlm(**inputs).logits, rtol=0, atol=1e-6)
    before = vlm(**inputs).logits
    vlm.fold_token_rows()  # merge/export: the rows move into the embedding table, same function
    torch.testing.assert_close(vlm(**inputs).logits, before, rtol=0, atol=1e-6)


def test_generation_stops_and_batches_like_single_answers(tmp_path):
    vlm = _vlm(tmp_path, "gemma").eval()
    eot = vlm.tokenizer.token_to_id("<end_of_turn>")
    assert vlm.stop_token_ids[0] == eot and vlm.pad_token_id == vlm.tokenizer.token_to_id("<pad>")
    img = Image.new("RGB", (24, 24), (200, 30, 30))
    msgs = [{"role": "user", "content": "<image>\nwhat?"}]
    ids, px = torch.tensor([vlm.chat_ids(msgs, 1)]), vlm.image_processor([img])
    free = vlm.generate(ids, pixel_values=px, max_new_tokens=6, stop_token_ids=[])[0]
    assert len(free) == 6
    with torch.no_grad():
        first = int(vlm(ids, pixel_values=px).logits[0, -1].argmax())
    assert free[0] == first  # greedy = argmax of the forward logits
    stop = free[3]
    cut = vlm.generate(ids, pixel_values=px, max_new_tokens=6, stop_token_ids=[stop])[0]
    assert cut == free[:free.index(stop)]  # stops before the first stop token, which is not returned
    streamed = []
    vlm.generate(ids, pixel_values=px, max_new_tokens=6, stop_token_ids=[stop],
                 streamer=lambda b, t: streamed.append((b, t)))
    assert streamed == [(0, t) for t in cut]
    hi = [{"role": "user", "content": "hi"}]
    assert vlm.chat_batch([([img], msgs), ([], hi)], max_new_tokens=3, stop_token_ids=[]) == [
        vlm.chat([img], msgs, max_new_tokens=3, stop_token_ids=[]), vlm.chat([], hi, max_new_tokens=3, stop_token_ids=[])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("shapes"))


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_trains_through_train_py_with_default_lora_then_answers_through_test_py(tmp_path, data, family, capsys):
    lm = write_tiny_family(tmp_path / f"lm_{family}", family)
    model = {"lm": str(lm), "lm_backend": "hf", "towers": [dict(TINY_TOWER)], "image_mode": "resize",
             "projector": "mlp2x_gelu"}
    cfg = tiny_train_config(tmp_path, data, model=model, stage="sft", lora={"r": 4}, vision_lr=0.0, max_steps=3)
    assert entry("train").main([str(tmp_path / "tiny_config.yaml")]) == 0
    out = cfg.output_dir
    log = (tmp_path / "run" / "train.log").read_text()
    assert "LoRA r=4" in log and "q_proj" in log  # the architecture's default targets
    loaded = VLM.from_pretrained(f"{out}/final")
    assert loaded.chat_format.template.name == TEMPLATE_OF[family]
    assert loaded.tokenizer.token_to_id(IMAGE_TOKEN) == loaded.image_token_id  # the tokenizer was saved with it
    img = data / "images/val/000000.png"
    expect = loaded.chat([load_image(str(img))], [{"role": "user", "content": "<image>\nWhat colour is it?"}],
                         max_new_tokens=4)
    answer = answer_of_test_py(["--model", out, "--image", str(img), "--prompt", "What colour is it?",
                                "--max-new-tokens", "4"], capsys)
    assert answer.endswith(expect)  # test.py prints the reply last


def test_load_lm_tokenizer_picks_the_qwen_interface_by_the_vocabulary(tmp_path):
    """Qwen2's ChatML + <|image_pad|> -> the Qwen interface; ChatML alone (SmolLM) or Qwen2's without its
    vision tokens stays a plain HFTokenizer."""
    from qwenvl_lab.model.tokenizers import HFTokenizer, load_lm_tokenizer
    from qwenvl_lab.qwen import HFQwenTokenizer

    from tests.tiny_lms import tiny_family_tokenizer
    from tests.tiny_qwen import write_tiny_hf_tokenizer

    write_tiny_hf_tokenizer(tmp_path / "qwen2")
    write_tiny_hf_tokenizer(tmp_path / "no_vl", with_vl_tokens=False)
    tiny_family_tokenizer("smollm").save_pretrained(str(tmp_path / "smollm"))
    assert isinstance(load_lm_tokenizer(tmp_path / "qwen2"), HFQwenTokenizer)
    for name in ("no_vl", "smollm"):
        tok = load_lm_tokenizer(tmp_path / name)
        assert type(tok) is HFTokenizer and tok.token_to_id("<|im_start|>") >= 0
