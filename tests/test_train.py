"""Training end to end on tiny models: train -> save -> load -> generate, exact resume, LR groups,
trainable sets per stage, token-normalised gradient accumulation, and the CLI entry points."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from qwenvl_lab.trainer.callbacks import read_log

from tests.tiny_server import entry
from tests.tiny_train import make_tiny_data, tiny_train_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("shapes"))


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_log(run_dir / "log.jsonl") if "loss" in r}


def _first_batch(vlm, data, n=3):
    from qwenvl_lab.dataset import Collator, VLMDataset

    ds = VLMDataset([str(data / "train.jsonl")], vlm.tokenizer, vlm.image_processor, vlm.tokens_per_image,
                    image_folder=str(data))
    batch = Collator(vlm.tokenizer.eod_id)([ds[i] for i in range(n)])
    return dict(batch)


def test_train_save_load_generate(tmp_path, data):
    from qwenvl_lab.model import VLM
    from qwenvl_lab.trainer.run import train

    result = train(tiny_train_config(tmp_path, data, max_steps=6))
    out = result.output_dir
    for name in ("config.yaml", "log.jsonl", "loss.png", "data_report.json", "final/model.safetensors"):
        assert (out / name).is_file(), name
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[6] < losses[1], losses  # it learns something

    trained = result.model.eval()
    loaded = VLM.from_pretrained(out / "final").eval()
    batch = _first_batch(loaded, data)
    with torch.no_grad():
        a = trained(**{k: v for k, v in batch.items() if k != "labels"}).logits
        b = loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.equal(a, b)

    from qwenvl_lab.dataset import load_image

    image = load_image(str(data / "images/val/000000.png"))
    messages = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}]
    reply_a = trained.chat([image], messages, max_new_tokens=4)
    reply_b = loaded.chat([image], messages, max_new_tokens=4)
    assert isinstance(reply_a, str) and reply_a == reply_b


def test_resume_reproduces_losses_exactly(tmp_path, data):
    from qwenvl_lab.trainer.run import train

    full = train(tiny_train_config(tmp_path / "a", data, max_steps=6, save_steps=3)).output_dir
    # A second run that only has the step-3 checkpoint (as if killed after it) and resumes from it.
    resumed_dir = tmp_path / "b" / "run"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(full / "checkpoint-3", resumed_dir / "checkpoint-3")
    train(tiny_train_config(tmp_path / "b", data, max_steps=6, save_steps=3, resume_from_checkpoint="auto"))
    a, b = _losses(full), _losses(resumed_dir)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert a[step] == b[step], (step, a[step], b[step])
    # resume state is safetensors + JSON, never pickle
    names = {p.name for p in (full / "checkpoint-3").iterdir()}
    assert "optimizer_state.safetensors" in names and "rng_state_0.json" in names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin"))], names


def test_optimizer_groups_carry_configured_lrs(tmp_path, data):
    from qwenvl_lab.trainer.optim import param_groups
    from qwenvl_lab.trainer.run import build_model

    cfg = tiny_train_config(tmp_path, data, stage="sft", learning_rate=1e-3, projector_lr=5e-4, vision_lr=2e-5,
                            lora={"r": 4, "alpha": 8}, weight_decay=0.1)
    vlm = build_model(cfg)
    groups = {g["name"]: g for g in param_groups(vlm, cfg.learning_rate, cfg.projector_lr, cfg.vision_lr,
                                                  cfg.weight_decay)}
    assert groups["projector"]["lr"] == 5e-4 and groups["projector_no_decay"]["lr"] == 5e-4
    assert groups["lm"]["lr"] == 1e-3 and groups["vision"]["lr"] == 2e-5
    assert groups["projector"]["weight_decay"] == 0.1 and groups["projector_no_decay"]["weight_decay"] == 0.0
    for g in groups.values():  # biases and norms never decay; 2-D weights do
        for name, p in zip(g["param_names"], g["params"]):
            assert (g["weight_decay"] == 0.0) == (p.ndim < 2 or "norm" in name or ".ln_" in name), name
    assert all("lora_" in n for n in groups["lm"]["param_names"])


@pytest.mark.parametrize("stage,vision_lr,expect", [
    ("align", 0.0, {"projector"}),
    ("sft", 0.0, {"projector", "lora"}),
    ("full", 0.0, {"projector", "lm"}),
    ("full", 1e-4, {"projector", "lm", "towers"}),
])
def test_trainable_set_per_stage(tmp_path, data, stage, vision_lr, expect):
    from qwenvl_lab.trainer.run import build_model

    cfg = tiny_train_config(tmp_path, data, stage=stage, vision_lr=vision_lr, lora={"r": 4})
    vlm = build_model(cfg)
    parts = set()
    for name, p in vlm.named_parameters():
        if p.requires_grad:
            parts.add("lora" if "lora_" in name else name.split(".")[0])
    assert parts == expect


def test_freeze_and_unfreeze_regexes(tmp_path, data):
    from qwenvl_lab.trainer.run import build_model

    cfg = tiny_train_config(tmp_path, data, stage="full", vision_lr=0.0, freeze=[r"lm\.transformer\.h\.0\."],
                            unfreeze=[r"towers\..*layer1"])
    vlm = build_model(cfg)
    state = {n: p.requires_grad for n, p in vlm.named_parameters()}
    assert not any(v for n, v in state.items() if n.startswith("lm.transformer.h.0."))
    assert all(v for n, v in state.items() if n.startswith("lm.transformer.h.1."))
    assert all(v for n, v in state.items() if "layer1" in n and n.startswith("towers."))
    assert not any(v for n, v in state.items() if "layer2" in n and n.startswith("towers."))


def test_gradient_accumulation_is_token_normalised(tmp_path, data):
    """Batch 4 in one step and 2 x 2 accumulated give the same first-step loss and weights."""
    from qwenvl_lab.trainer.run import train

    # Frozen towers (vision_lr=0): batch-norm statistics of a training tower depend on the micro-batch.
    common = dict(max_steps=1, group_by_length=False, learning_rate=1e-2, vision_lr=0.0)
    one = train(tiny_train_config(tmp_path / "one", data, per_device_train_batch_size=4, **common))
    acc = train(tiny_train_config(tmp_path / "acc", data, per_device_train_batch_size=2,
                                  gradient_accumulation_steps=2, **common))
    la, lb = _losses(one.output_dir)[1], _losses(acc.output_dir)[1]
    assert abs(la - lb) < 1e-5, (la, lb)
    sa, sb = one.model.state_dict(), acc.model.state_dict()
    worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    assert worst < 1e-5, worst


def test_train_cli_rejects_bad_configs(tmp_path, data, capsys):
    from qwenvl_lab.core.cli import run_cli

    main = entry("train").main

    def cli(argv):  # the entry point as the command line runs it
        return run_cli(main, argv)

    good = tmp_path / "tiny_config.yaml"
    tiny_train_config(tmp_path, data)  # writes the YAML
    assert cli([str(good), "learning_rat=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "learning_rate" in err  # names the bad key and lists valid ones
    assert cli([str(good), "stage=pretrain"]) == 2
    assert "'align', 'sft', 'full'" in capsys.readouterr().err
    assert cli([str(good), "max_steps=many"]) == 2
    assert "max_steps" in capsys.readouterr().err
    assert cli([str(good), "model.projektor=linear"]) == 2
    assert "projektor" in capsys.readouterr().err
    assert cli([str(good), "data_weights=[1.0, 2.0]"]) == 2
    assert "data_weights" in capsys.readouterr().err
    assert cli([str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_test_cli_answers_like_chat(tmp_path, data, capsys):
    test_entry = entry("test")
    from qwenvl_lab.model import VLM
    from qwenvl_lab.trainer.run import train

    out = train(tiny_train_config(tmp_path, data, max_steps=2)).output_dir
    img = data / "images/val/000001.png"
    assert test_entry.main(["--model", str(out), "--image", str(img), "--prompt", "What shape is this?",
                            "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    from qwenvl_lab.dataset import load_image

    vlm = VLM.from_pretrained(out / "final")
    expect = vlm.chat([load_image(str(img))], [{"role": "user", "content": "<image>\nWhat shape is this?"}],
                      max_new_tokens=4)
    assert printed == expect.strip()
    # the original repo's flags, with <|extra_0|> marking the image
    assert test_entry.main(["--model_weights", str(out), "--image_path", str(img),
                            "--prompt", "<|extra_0|>\nWhat shape is this?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == expect.strip()
    # a whole file in batches
    answers = tmp_path / "answers.jsonl"
    assert test_entry.main(["--model", str(out), "--input", str(data / "val.jsonl"), "--output", str(answers),
                            "--image-folder", str(data), "--max-new-tokens", "4", "--batch-size", "3"]) == 0
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert len(rows) == 8 and all("answer" in r and r["reference"] for r in rows)


def test_evaluation_during_training_logs_eval_loss(tmp_path, data):
    from qwenvl_lab.trainer.run import train

    out = train(tiny_train_config(tmp_path, data, max_steps=4, eval_steps=2,
                                  eval_data_path=[str(data / "val.jsonl")])).output_dir
    evals = {r["step"]: r["eval_loss"] for r in read_log(out / "log.jsonl") if "eval_loss" in r}
    assert sorted(evals) == [2, 4] and all(v > 0 and v == v for v in evals.values())


def test_evaluation_files_keep_image_paths_inside_the_folder(tmp_path, data):
    from qwenvl_lab.dataset import BadSampleError
    from qwenvl_lab.trainer.evaluate import load_samples

    rec = {"id": "x", "images": ["../outside.png"],
           "messages": [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(BadSampleError, match="is outside the media folder"):
        load_samples(str(path), image_folder=str(data))
    (s,) = [s for _, s in load_samples(str(path), image_folder=str(data), allow_absolute_paths=True)]
    assert s.images[0].endswith("outside.png")
