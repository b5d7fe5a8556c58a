"""Released checkpoints through the project's operations: rendering with the checkpoint's own template, merge,
export, test.py / evaluation / server, and the memory plan for the real sizes (tiny random models built from
configs in the released layouts, offline).

Asserted:
- LLaVA-1.5 (Llama LM with a Llama-style tokenizer, its released chat template only in chat_template.json): a
  2-image record renders (render() and train.py's VLMDataset) to LlavaProcessor's input_ids (BOS, "USER:
  <image>\n... ASSISTANT: ...", 16 image tokens per image), labels equal the released template's
  `{% generation %}` assistant mask, the prompt ids equal the processor's, our loss equals transformers' within
  1e-5, a save/load round trip keeps the template, and the llava-hf export writes it back as it is;
- a run trained (train(), one sft step, LoRA + merger) from a released Qwen2-VL: `model.merge` writes the released
  layout (AutoModelForImageTextToText + AutoProcessor load it; logits within 1e-5 of the run's, 1e-3 away from the
  base's; greedy answers equal transformers' generate); `export --format peft-adapter` gives an adapter that
  `PeftModel.from_pretrained(released base, dir)` turns into the run's logits (1e-5) and answer, the merger as
  modules_to_save (the run's lora/ alone differs by > 1e-3); `--format llava-hf` is one line, exit 2;
- test.py answers the same for the run and the merged directory; the evaluation CLI answers vqav2 identically
  for both and runs mmbench in likelihood mode; reply log-probs equal transformers' teacher forcing (1e-4);
- the server (`serve.cli.build`'s app) answers a chat completion for the run and the merged directory through the
  model's own generate, equal to transformers' generate, streamed in several deltas, one request at a time;
  `GenerateEngine` repeats seeded sampling, keeps max_tokens, and serves Idefics3 / SmolVLM equal to `chat`;
- the plan of configs/released/qwen2_5_vl_lora.yaml and llava_next_7b_lora.yaml from a config.json alone (the
  real sizes): base parameters equal a meta-device transformers model's, LoRA = r x layers x sum(in + out).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from qwenvl_lab.dataset.rendering import render
from qwenvl_lab.dataset.sample import Sample

from tests.tiny_released import RECORD, write_llava15
from tests.tiny_released import images as _images


def _square_images(n: int = 2):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def _with_images(messages: list[dict], images: list) -> list[dict]:
    """transformers' part layout with the PIL images in their image parts (apply_chat_template tokenize=True)."""
    it = iter(images)
    return [{**m, "content": [{**p, "image": next(it)} if p["type"] == "image" else p for p in m["content"]]}
            for m in messages]


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    from qwenvl_lab.model.model import VLM
    from transformers import AutoProcessor

    path = write_llava15(tmp_path_factory.mktemp("llava15") / "llava-1.5")
    return path, VLM.from_pretrained(path).eval(), AutoProcessor.from_pretrained(str(path))


def test_llava15_renders_with_its_own_template(llava15):
    from qwenvl_lab.dataset.hf_template import hf_messages

    path, vlm, processor = llava15
    fmt = vlm.chat_format
    assert fmt.template.name == "own" and "ASSISTANT:" in fmt.jinja
    parts = hf_messages(RECORD)
    ref = processor.apply_chat_template(_with_images(parts, _square_images()), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    want = list(ref["input_ids"][0])
    ours = render(RECORD, fmt, vlm.tokens_per_image, image_token_id=vlm.image_token_id)
    assert ours.input_ids == want
    assert want[0] == processor.tokenizer.bos_token_id and want.count(vlm.image_token_id) == 2 * 16
    assert ours.n_images == 2 and ours.media == [("image", "a.png"), ("image", "b.png")]
    assert [y != -100 for y in ours.labels] == [bool(m) for m in ref["assistant_masks"][0]]
    assert all(y == -100 for t, y in zip(ours.input_ids, ours.labels) if t == vlm.image_token_id)
    trained = processor.tokenizer.decode([y for y in ours.labels if y != -100])
    assert "A red square." in trained and "A blue circle, small." in trained and "picture" not in trained

    prompt = processor.apply_chat_template(parts[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("ASSISTANT:")
    want_prompt = processor(text=prompt, images=_square_images(1), return_tensors="pt")["input_ids"][0].tolist()
    assert vlm.chat_ids(RECORD.messages[:1], 1) == want_prompt


def test_llava15_loss_equals_transformers_and_round_trips(llava15, tmp_path):
    from qwenvl_lab.model.model import VLM
    from transformers import LlavaForConditionalGeneration

    path, vlm, processor = llava15
    text = processor.apply_chat_template(_parts(), tokenize=False)
    inputs = processor(text=text, images=_square_images(), return_tensors="pt")
    ours = render(RECORD, vlm.chat_format, vlm.tokens_per_image, image_token_id=vlm.image_token_id)
    ids, labels = torch.tensor([ours.input_ids]), torch.tensor([ours.labels])
    assert torch.equal(ids, inputs["input_ids"])
    ref = LlavaForConditionalGeneration.from_pretrained(str(path)).eval()
    with torch.no_grad():
        theirs = ref(**inputs, labels=labels).loss
        mine = vlm(ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"], image_counts=[2],
                   labels=labels).loss
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    vlm.save_pretrained(tmp_path / "saved")  # our format keeps the template as it is
    again = VLM.from_pretrained(tmp_path / "saved")
    assert again.chat_format.jinja == vlm.chat_format.jinja
    assert render(RECORD, again.chat_format, again.tokens_per_image).input_ids == ours.input_ids


def test_llava15_items_of_the_native_dataset_path(llava15, tmp_path):
    """train.py's data path (`trainer.run.build_datasets` -> VLMDataset) renders with the checkpoint's template:
    its items' ids and labels are the processor's ids and the template's generation mask."""
    import json

    from qwenvl_lab.dataset.hf_template import hf_messages
    from qwenvl_lab.trainer.run import build_datasets

    from tests.tiny_train import tiny_train_config

    path, vlm, processor = llava15
    for name, img in zip("ab", _square_images()):
        img.save(tmp_path / f"{name}.png")
    (tmp_path / "train.jsonl").write_text(json.dumps(_TRAIN_RECORD) + "\n")
    cfg = tiny_train_config(tmp_path, tmp_path, model=None, init_from=str(path), stage="sft",
                            lora={"r": 4, "alpha": 8, "dropout": 0.0}, max_length=200)
    item = build_datasets(cfg, vlm)[0][0]
    ref = processor.apply_chat_template(_with_images(hf_messages(RECORD), _square_images()), tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    assert item["input_ids"].tolist() == list(ref["input_ids"][0])
    assert [y != -100 for y in item["labels"].tolist()] == [bool(m) for m in ref["assistant_masks"][0]]
    assert item["pixel_values"].shape[0] == 2


def _parts() -> list[dict]:
    from qwenvl_lab.dataset.hf_template import hf_messages

    return hf_messages(RECORD)


# ----- a run trained from a released Qwen2-VL with LoRA (train(), one sft step) ---------------------------------
_TRAIN_RECORD = {"image": ["a.png", "b.png"], "conversations": [
    {"from": "human", "value": "<image>\nWhat is in the first picture?"}, {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "And here <image> what?"}, {"from": "gpt", "value": "A blue circle, small."}]}
QUESTION = [{"role": "user", "content": "<image> and <image>: which is red?"}]


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    """(released base dir, run dir) of one stage=sft step (LoRA r=4 + the merger) at a rate large enough that
    the trained model's logits differ visibly from the base's."""
    import json

    from qwenvl_lab.trainer.run import train

    from tests.tiny_released import write_released
    from tests.tiny_train import tiny_train_config

    root = tmp_path_factory.mktemp("qwen_run")
    base = write_released(root / "Qwen2-VL-tiny", "qwen2_vl")
    for i, img in enumerate(_images()):
        img.save(root / f"{'ab'[i]}.png")
    (root / "train.jsonl").write_text("\n".join(json.dumps(_TRAIN_RECORD) for _ in range(2)) + "\n")
    cfg = tiny_train_config(root, root, model=None, init_from=str(base), stage="sft", max_steps=1,
                            per_device_train_batch_size=2, learning_rate=0.05, projector_lr=0.05, vision_lr=0.0,
                            lora={"r": 4, "alpha": 8, "dropout": 0.0}, max_length=400, weight_decay=0.0)
    train(cfg)
    return base, root / "run"


def _qwen_inputs(processor, messages=QUESTION, generation=True):
    from qwenvl_lab.dataset.hf_template import hf_messages

    parts = hf_messages(Sample(id="q", messages=messages))
    text = processor.apply_chat_template(parts, tokenize=False, add_generation_prompt=generation)
    return processor(text=[text], images=_images(), return_tensors="pt")


def _generate(model, inputs, stops: list[int], n: int = 8) -> list[int]:
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=stops)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return new[: next((i for i, t in enumerate(new) if t in stops), len(new))]


def test_merge_writes_the_released_layout(qwen_run, tmp_path):
    from qwenvl_lab.model.merge import main as merge_main
    from qwenvl_lab.model.model import load_vlm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base, run = qwen_run
    assert merge_main(["--src", str(run), "--dst", str(tmp_path / "merged")]) == 0
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "released.json").exists() and not (merged_dir / "lora").exists()
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(merged_dir))
    assert processor.chat_template is not None and not any("lora_" in n for n, _ in merged.named_parameters())
    ours = load_vlm(run)
    inputs = _qwen_inputs(processor, RECORD.messages, generation=False)
    assert ours.render(RECORD, _images())["input_ids"] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        theirs = merged(**inputs).logits
        mine = ours(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
        untrained = AutoModelForImageTextToText.from_pretrained(str(base)).eval()(**inputs).logits
    assert (theirs - mine).abs().max().item() < 1e-5
    assert (theirs - untrained).abs().max().item() > 1e-3  # the run's adapters and merger are in it
    prompt = _qwen_inputs(processor)
    want = processor.tokenizer.decode(_generate(merged, prompt, ours.stop_token_ids), skip_special_tokens=True)
    assert want and ours.chat(_images(), QUESTION, max_new_tokens=8) == want
    assert load_vlm(merged_dir).chat(_images(), QUESTION, max_new_tokens=8) == want


def test_export_peft_adapter_puts_the_run_on_the_released_base(qwen_run, tmp_path, capsys):
    from peft import PeftModel
    from qwenvl_lab.model.export import main as export_main
    from qwenvl_lab.model.model import load_vlm
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    base, run = qwen_run
    assert export_main(["--src", str(run), "--dst", str(tmp_path / "adapter"), "--format", "peft-adapter"]) == 0
    assert "modules_to_save: model.visual.merger" in capsys.readouterr().out
    processor = AutoProcessor.from_pretrained(str(base))
    inputs = _qwen_inputs(processor, RECORD.messages, generation=False)
    ours = load_vlm(run)

    def logits(model):
        with torch.no_grad():
            return model(**inputs).logits

    mine = ours(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits.detach()
    peft = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(str(base)),
                                     str(tmp_path / "adapter")).eval()
    assert (logits(peft) - mine).abs().max().item() < 1e-5
    lora_only = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(str(base)),
                                          str(run / "final" / "lora")).eval()
    assert (logits(lora_only) - mine).abs().max().item() > 1e-3  # the merger rides along as modules_to_save
    prompt = _qwen_inputs(processor)
    want = processor.tokenizer.decode(_generate(peft, prompt, ours.stop_token_ids), skip_special_tokens=True)
    assert ours.chat(_images(), QUESTION, max_new_tokens=8) == want


def test_export_of_a_released_run_refuses_llava_hf_in_one_line(qwen_run, tmp_path, capsys):
    from qwenvl_lab.core.cli import run_cli
    from qwenvl_lab.model.export import main as export_main

    _, run = qwen_run
    capsys.readouterr()
    assert run_cli(export_main, ["--src", str(run), "--dst", str(tmp_path / "x"), "--format", "llava-hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: export: ")
    assert "qwen2_vl model, which has no llava-hf layout" in err and "model.merge" in err


# ----- test.py, the evaluation CLI and the server on a wrapper run and on its merged directory ----------------
@pytest.fixture(scope="module")
def merged(qwen_run, tmp_path_factory):
    from qwenvl_lab.model.merge import merge

    return merge(qwen_run[1], tmp_path_factory.mktemp("merged") / "Qwen2-VL-merged")


def test_test_py_answers_for_the_run_and_the_merged_model(qwen_run, merged, tmp_path, capsys):
    from qwenvl_lab.model.model import load_vlm

    from tests.tiny_server import answer_of_test_py

    _images()[0].save(tmp_path / "a.png")
    args = ["--image", str(tmp_path / "a.png"), "--prompt", "What is it?", "--max-new-tokens", "6"]
    from_run = answer_of_test_py(["--model", str(qwen_run[1]), *args], capsys)
    from_merged = answer_of_test_py(["--model", str(merged), *args], capsys)
    want = load_vlm(qwen_run[1]).chat(_images()[:1], [{"role": "user", "content": "What is it?"}], max_new_tokens=6)
    assert from_run == from_merged == want and want


def test_evaluation_cli_generation_and_likelihood(qwen_run, merged, tmp_path, capsys):
    from qwenvl_lab.evaluation.__main__ import main as eval_main
    from qwenvl_lab.evaluation.runner import read_answers

    from tests import tiny_bench as tb

    root, images = tb.write_vqav2(tmp_path / "vqav2")
    answers = []
    for name, model in (("run", qwen_run[1]), ("merged", merged)):
        out = tmp_path / name
        assert eval_main(["--model", str(model), "--task", "vqav2", "--data", str(root), "--images", str(images),
                          "--max-new-tokens", "4", "--batch-size", "2", "--output", str(out)]) == 0
        assert "vqav2: 3 scored of 3" in capsys.readouterr().out
        answers.append(read_answers(out / "answers.jsonl"))
    assert len(answers[0]) == 3 and answers[0] == answers[1]  # batched answers of the run == the merged model's
    mmb = tb.write_mmbench(tmp_path / "mmb")
    assert eval_main(["--model", str(qwen_run[1]), "--task", "mmbench", "--data", str(mmb), "--mc-mode",
                      "likelihood", "--output", str(tmp_path / "mmb_out")]) == 0
    picked = read_answers(tmp_path / "mmb_out" / "answers.jsonl")
    assert len(picked) == 5 and set(picked.values()) <= {"A", "B", "C", "D"}


def test_likelihood_equals_transformers_teacher_forcing(qwen_run, merged):
    from qwenvl_lab.dataset.hf_template import hf_messages
    from qwenvl_lab.evaluation.likelihood import reply_logprobs
    from qwenvl_lab.model.model import load_vlm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vlm = load_vlm(qwen_run[1])
    msgs = [{"role": "user", "content": "<image>\nWhich colour?"}]
    options = ["red", "dark green"]
    got = reply_logprobs(vlm, _images()[:1], msgs, options)
    processor = AutoProcessor.from_pretrained(str(merged))
    model = AutoModelForImageTextToText.from_pretrained(str(merged)).eval()
    prompt = processor.apply_chat_template(hf_messages(Sample(id="p", messages=msgs)), tokenize=False,
                                           add_generation_prompt=True)
    n_base = processor(text=[prompt], images=_images()[:1], return_tensors="pt")["input_ids"].shape[1]
    for opt, (total, n, _) in zip(options, got):
        full = hf_messages(Sample(id="f", messages=msgs + [{"role": "assistant", "content": opt}]))
        inputs = processor(text=[processor.apply_chat_template(full, tokenize=False)], images=_images()[:1],
                           return_tensors="pt")
        ids = inputs["input_ids"][0]
        with torch.no_grad():
            lp = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)  # [T, V]
        want = sum(lp[p - 1, ids[p]].item() for p in range(n_base, n_base + n))  # the reply + its <|im_end|>
        assert processor.tokenizer.decode(ids[n_base:n_base + n]) == opt + "<|im_end|>"
        assert total == pytest.approx(want, abs=1e-4)


def test_server_answers_through_the_models_own_generate(qwen_run, merged, capsys):
    import argparse
    import json

    pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn (pip install .[serve])")
    from fastapi.testclient import TestClient
    from qwenvl_lab.model.model import load_vlm
    from qwenvl_lab.serve.cli import add_server_args, build
    from qwenvl_lab.serve.generate_engine import GenerateEngine
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.tiny_serve import data_url
    from tests.tiny_server import free_port

    processor = AutoProcessor.from_pretrained(str(merged))
    hf = AutoModelForImageTextToText.from_pretrained(str(merged)).eval()
    stops = load_vlm(qwen_run[1]).stop_token_ids
    # The server writes an image part as <image> and a newline between an image and the text (serve/protocol.py).
    asked = [{"role": "user", "content": "<image><image>\nWhich is red?"}]
    prompt = _qwen_inputs(processor, asked)
    want = processor.tokenizer.decode(_generate(hf, prompt, stops, n=8), skip_special_tokens=True)
    assert want
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in _images()]
    content.append({"type": "text", "text": "Which is red?"})
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8}

    def check(post) -> None:
        status, raw = post(body)
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["choices"][0]["message"]["content"] == want
        assert answer["usage"]["prompt_tokens"] == prompt["input_ids"].shape[1]
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # no prefix cache on this path
        status, raw = post({**body, "stream": True})
        events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
        deltas = [d for d in (e["choices"][0]["delta"].get("content") for e in events if e["choices"]) if d]
        assert "".join(deltas) == want and len(deltas) > 1  # token by token, not one piece at the end

    # `python -m qwenvl_lab.serve`'s own build (model load, engine choice, routes), answered in this process
    for model_dir in (qwen_run[1], merged):
        ap = argparse.ArgumentParser()
        add_server_args(ap, port=free_port())
        capsys.readouterr()
        app, engine, _ = build(ap.parse_args(["--model", str(model_dir), "--served-model-name", "m", "--device", "cpu"]))
        assert isinstance(engine, GenerateEngine)
        assert "decoded by the model's own generate, one request at a time" in capsys.readouterr().out
        engine.start()
        try:
            with TestClient(app) as client:
                def post(b):
                    r = client.post("/v1/chat/completions", json=b)
                    return r.status_code, r.content
                check(post)
                assert client.get("/health").json()["max_batch"] == 1
                metrics = client.get("/metrics")
                assert metrics.status_code == 200, metrics.text
                counts = dict(line.rsplit(" ", 1) for line in metrics.text.splitlines()
                              if line and not line.startswith("#"))
                assert float(counts["qwenvl_serve_time_to_first_token_seconds_count"]) == 2  # two requests served
        finally:
            engine.stop()


# ----- the memory plan for the real sizes, from the released config.json alone ---------------------------------
ROOT = Path(__file__).resolve().parents[1]
PLANS = {  # recipe -> (config.json fixture, transformers class, LoRA widths (in, out) per layer, layers)
    "qwen2_5_vl_lora.yaml": ("Qwen--Qwen2.5-VL-7B-Instruct.json", "Qwen2_5_VLForConditionalGeneration",
                             [(3584, 3584), (3584, 512), (3584, 512), (3584, 3584), (3584, 18944), (3584, 18944),
                              (18944, 3584)], 28),
    "llava_next_7b_lora.yaml": ("llava-hf--llava-v1.6-vicuna-7b-hf.json", "LlavaNextForConditionalGeneration",
                                [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)], 32),
}


def _row(out: str, name: str) -> list[int]:
    """The numbers of the plan's parameter row `name` (total, trainable)."""
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
    return [int(x.replace(",", "")) for x in line.split()[1:3]]


@pytest.mark.parametrize("recipe", sorted(PLANS))
def test_plan_of_the_real_sizes_from_config_json_alone(recipe, tmp_path, capsys):
    import json
    import shutil

    import transformers
    from qwenvl_lab.model.families import FAMILIES
    from qwenvl_lab.model.plan import config_file
    from qwenvl_lab.model.plan import main as plan_main
    from qwenvl_lab.model.plan_released import released_config
    from transformers import AutoConfig

    fixture, cls, widths, layers = PLANS[recipe]
    released = tmp_path / "released"  # config.json only: no weights, no tokenizer
    released.mkdir()
    shutil.copy(ROOT / "configs" / "hub" / fixture, released / "config.json")
    raw = json.loads((released / "config.json").read_text())
    with torch.device("meta"):
        reference = getattr(transformers, cls)(AutoConfig.for_model(**raw))
    n_ref = sum(p.numel() for p in reference.parameters())
    recipe_path = ROOT / "configs" / "released" / recipe
    hub_id = yaml_init_from(recipe_path)
    family, _ = released_config(hub_id, config_file)  # offline: the recipe's hub id is the shipped fixture
    assert family is FAMILIES[raw["model_type"]]
    capsys.readouterr()
    assert plan_main([str(recipe_path), f"init_from={released}", "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    lora, total = _row(out, "lora"), _row(out, "total")
    assert total[0] - lora[0] == n_ref  # the model the run trains, counted from config.json alone
    assert lora == [64 * layers * sum(i + o for i, o in widths)] * 2  # r=64 on the LM's 7 linears, all trainable
    assert total[1] > lora[1]  # + the projector (merger) at its own rate
    ddp = next(ln for ln in out.splitlines() if ln.split()[:1] == ["DDP"]).split()
    assert float(ddp[5]) > 0 and ddp[6] == "yes"  # GiB per GPU, fits 80 GiB


def yaml_init_from(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["init_from"]


def test_generate_engine_sampling_is_seeded_and_lengths_are_kept(qwen_run):
    import threading

    from qwenvl_lab.model.model import load_vlm
    from qwenvl_lab.serve.decode import SamplingParams
    from qwenvl_lab.serve.engine import Job
    from qwenvl_lab.serve.generate_engine import GenerateEngine, uses_own_generate

    vlm = load_vlm(qwen_run[1])
    assert uses_own_generate(vlm)
    engine = GenerateEngine(vlm, max_queue=4)
    engine.start()
    ids = vlm.chat_ids(QUESTION, 2, vlm.image_tokens(_images()))
    images = vlm.image_inputs(_images())

    def run(params: SamplingParams) -> Job:
        done = threading.Event()
        job = Job(ids, images, params, lambda kind, data: done.set() if kind in ("done", "error") else None)
        engine.submit(job)
        assert done.wait(60)
        return job

    try:
        a, b = (run(SamplingParams(max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)) for _ in range(2))
        assert a.tokens == b.tokens and len(a.tokens) == 5 and a.finish_reason == "length"
        greedy = run(SamplingParams(max_tokens=8))
        assert greedy.text == vlm.chat(_images(), QUESTION, max_new_tokens=8)
        assert engine.stats()["admitted"] == 3 and engine.stats()["max_batch"] == 1
    finally:
        engine.stop()


def test_llava15_export_keeps_its_own_template(llava15, tmp_path):
    from qwenvl_lab.dataset.hf_template import hf_messages
    from qwenvl_lab.model.export import export_llava_hf
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path, vlm, processor = llava15
    export_llava_hf(vlm, tmp_path / "export")
    exported = AutoProcessor.from_pretrained(str(tmp_path / "export"))
    parts = hf_messages(RECORD)
    assert exported.apply_chat_template(parts, tokenize=False) == processor.apply_chat_template(parts, tokenize=False)
    want = processor(text=processor.apply_chat_template(parts, tokenize=False), images=_square_images(),
                     return_tensors="pt")
    got = exported(text=exported.apply_chat_template(parts, tokenize=False), images=_square_images(),
                   return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    reference = LlavaForConditionalGeneration.from_pretrained(str(path)).eval()
    with torch.no_grad():
        assert (model(**want).logits - reference(**want).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["idefics3", "smolvlm", "llava_onevision", "llava_next_video"])
def test_generate_engine_serves_the_tiled_families(family, tmp_path):
    """Idefics3 / SmolVLM / OneVision / NeXT-Video (family serving "generate": no KV-cache step for our engine)
    through the same engine: the greedy answer equals `chat`'s, which equals transformers' generate
    (tests/test_families_idefics.py, tests/test_families_video.py)."""
    import threading

    from PIL import Image
    from qwenvl_lab.model.model import load_vlm
    from qwenvl_lab.serve.decode import SamplingParams
    from qwenvl_lab.serve.engine import Job
    from qwenvl_lab.serve.generate_engine import GenerateEngine, uses_own_generate

    from tests.test_families_idefics import write_released as write_tiled
    from tests.tiny_llava_video import save_next_video, save_onevision

    save = {"llava_onevision": save_onevision, "llava_next_video": save_next_video}.get(family)
    vlm = load_vlm(save(tmp_path / family) if save else write_tiled(tmp_path / family, family))
    assert uses_own_generate(vlm)
    images = [Image.new("RGB", (40, 30), (200, 10, 10))]
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}]
    engine = GenerateEngine(vlm)
    engine.start()
    try:
        done = threading.Event()
        job = Job(vlm.chat_ids(messages, 1, vlm.image_tokens(images)), vlm.image_inputs(images),
                  SamplingParams(max_tokens=6), lambda kind, data: done.set() if kind in ("done", "error") else None)
        engine.submit(job)
        assert done.wait(60) and job.finish_reason in ("stop", "length")
    finally:
        engine.stop()
    assert job.tokens and job.text == vlm.chat(images, messages, max_new_tokens=6)
