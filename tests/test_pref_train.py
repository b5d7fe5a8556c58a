"""Stage dpo end to end through train.py on a tiny model: pairs from the shapes data (chosen = the right
answer, rejected = another answer of the same question type), the first step's DPO loss is ln 2, trl's metric
names and the held-out evaluation reach log.jsonl, checkpoints carry the reference, a resume continues the
same losses, and the preference keys answer mistakes with one line."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from qwenvl_lab.core.cli import run_cli
from qwenvl_lab.trainer.callbacks import read_log

from tests.tiny_server import entry
from tests.tiny_train import make_tiny_data, tiny_model_section

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def _pairs(records: list[dict]) -> list[tuple[dict, str]]:
    """(record, rejected answer): another answer given to the same question type."""
    answers: dict[str, list[str]] = {}
    for r in records:
        answers.setdefault(r["type"], []).append(r["messages"][1]["content"])
    out = []
    for r in records:
        right = r["messages"][1]["content"]
        wrong = next((a for a in sorted(set(answers[r["type"]])) if a != right), None)
        if wrong is not None:
            out.append((r, wrong))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_tiny_data(tmp_path_factory.mktemp("shapes"))
    train = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (root / "val.jsonl").read_text().splitlines()]
    with open(root / "pref_train.jsonl", "w") as f:  # RLAIF-V's layout; 8 pairs: every step sees them all
        for i, (r, wrong) in enumerate(_pairs(train)[:8]):
            q = r["messages"][0]["content"].replace("<image>\n", "")
            f.write(json.dumps({"idx": i, "image": r["images"][0], "question": q,
                                "chosen": r["messages"][1]["content"], "rejected": wrong}) + "\n")
    with open(root / "pref_val.jsonl", "w") as f:  # LLaMA-Factory's sharegpt pairs
        for r, wrong in _pairs(val):
            f.write(json.dumps({"conversations": [{"from": "human", "value": r["messages"][0]["content"]}],
                                "chosen": {"from": "gpt", "value": r["messages"][1]["content"]},
                                "rejected": {"from": "gpt", "value": wrong}, "images": r["images"]}) + "\n")
    return root


def _config(tmp_path, data, **overrides) -> str:
    model = dict(tiny_model_section(data), freeze_towers=True)
    cfg = {"model": model, "stage": "dpo", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "data_path": [str(data / "pref_train.jsonl")], "eval_data_path": [str(data / "pref_val.jsonl")],
           "image_folder": str(data), "max_length": 160, "learning_rate": 2e-2, "warmup_ratio": 0.0,
           "lr_scheduler_type": "constant", "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
           "max_steps": 6, "logging_steps": 1, "eval_steps": 3, "save_steps": 3, "precision": "fp32",
           "report_to": [], "output_dir": str(tmp_path / "run"), "beta": 0.5, "group_by_length": False}
    cfg.update(overrides)
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _train(argv) -> int:
    return run_cli(entry("train").main, argv)


def test_dpo_run_logs_trl_metrics_evaluates_and_resumes(tmp_path, data):
    cfg = _config(tmp_path, data)
    assert _train([cfg]) == 0
    run = tmp_path / "run"
    rows = read_log(run / "log.jsonl")
    train_rows = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train_rows) == [1, 2, 3, 4, 5, 6]
    assert abs(train_rows[1]["loss"] - math.log(2)) < 1e-5  # step 0: policy == reference
    assert abs(train_rows[1]["rewards/margins"]) < 1e-6
    for r in train_rows.values():
        assert set(METRICS) <= set(r)
    assert train_rows[6]["loss"] < math.log(2) - 0.05 and train_rows[6]["rewards/margins"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(set(f"eval_{m}" for m in METRICS) <= set(r) for r in evals)
    assert 0.0 <= evals[-1]["eval_rewards/accuracies"] <= 1.0
    assert (run / "checkpoint-3" / "reference.safetensors").is_file()
    assert (run / "final").is_dir() and (run / "data_report.json").is_file()
    from PIL import Image

    assert Image.open(run / "loss.png").size == (1100, 400)  # the loss panel and the rewards panel

    # resume from step 3 in a second run directory: the same losses at steps 4..6 (the reference comes back)
    run2 = tmp_path / "run2"
    run2.mkdir()
    import shutil

    shutil.copytree(run / "checkpoint-3", run2 / "checkpoint-3")
    assert _train([cfg, f"output_dir={run2}", "resume_from_checkpoint=auto"]) == 0
    resumed = {r["step"]: r for r in read_log(run2 / "log.jsonl") if "loss" in r}
    for step in (4, 5, 6):
        assert abs(resumed[step]["loss"] - train_rows[step]["loss"]) < 1e-5, step
        assert abs(resumed[step]["rewards/margins"] - train_rows[step]["rewards/margins"]) < 1e-5


def test_precomputed_reference_logps_give_the_same_run(tmp_path, data, monkeypatch):
    from qwenvl_lab.model.preference import Reference

    passes = []
    active = Reference.active
    monkeypatch.setattr(Reference, "active", lambda self: passes.append(1) or active(self))
    logs, n_passes = {}, {}
    for pre in (False, True):
        out = tmp_path / f"run_{pre}"
        cfg = _config(tmp_path, data, output_dir=str(out), max_steps=3, save_steps=100, precompute_ref_logps=pre)
        passes.clear()
        assert _train([cfg]) == 0
        n_passes[pre] = len(passes)
        logs[pre] = {(r["step"], "loss" in r): r for r in read_log(out / "log.jsonl") if "loss" in r or "eval_loss" in r}
    table = json.loads((tmp_path / "run_True" / "reference_logps.json").read_text())
    assert len(table["train"]) == 8 and len(table["eval"]) == 4  # by pair id: "0".."7" (RLAIF-V idx), file#line
    assert set(table["train"]) == {str(i) for i in range(8)}
    assert not (tmp_path / "run_False" / "reference_logps.json").exists()
    assert n_passes == {False: 4, True: 2}  # a reference pass per step + the eval batch; once per dataset
    assert len(logs[False]) == 4  # 3 train rows and one evaluation
    for at, row in logs[False].items():
        for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins"):
            if key in row:
                assert abs(logs[True][at][key] - row[key]) < 1e-5, (at, key)


@pytest.mark.parametrize("kind", ["ipo", "simpo", "orpo"])
def test_other_losses_train(tmp_path, data, kind):
    cfg = _config(tmp_path, data, pref_loss=kind, max_steps=2, eval_steps=None, eval_data_path=None,
                  save_steps=100)
    assert _train([cfg]) == 0
    rows = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and "rewards/accuracies" in r for r in rows)
    if kind == "ipo":  # step 0: every log-ratio is 0, the loss is (1 / (2 beta))^2
        assert abs(rows[0]["loss"] - (1 / (2 * 0.5)) ** 2) < 1e-5


def test_preference_keys_answer_mistakes_with_one_line(tmp_path, data, capsys):
    cfg = _config(tmp_path, data)
    for override, words in (("beta=0", "beta must be > 0"), ("label_smoothing=0.7", "label_smoothing"),
                            ("pref_loss=kto", "pref_loss"), ("packing=true", "packing: not supported with stage=dpo"),
                            ("pref_loss=orpo", None)):
        argv = ["--check", cfg, override] + (["rpo_alpha=0.5"] if words is None else [])
        assert _train(argv) == 2, override
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and (words or "rpo_alpha") in err, err


def test_sft_adapter_start_is_folded_so_the_reference_is_the_sft_model(tmp_path, data, capsys):
    sft = tmp_path / "sft"
    cfg = _config(tmp_path, data, stage="sft", data_path=[str(data / "train.jsonl")], eval_data_path=None,
                  eval_steps=None, max_steps=3, learning_rate=5e-2, save_steps=100, output_dir=str(sft))
    assert _train([cfg]) == 0
    assert (sft / "final" / "lora").is_dir()  # a trainable-only SFT result: its adapters beside the base LM
    capsys.readouterr()  # the SFT run's progress bars
    dpo = _config(tmp_path, data, init_from=str(sft / "final"), model={}, max_steps=2, eval_steps=None,
                  eval_data_path=None, save_steps=100, output_dir=str(tmp_path / "dpo"))
    assert _train([dpo]) == 2  # folding needs a full final model: one line saying so
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: init_from=") and "save_full_model=true" in err
    assert _train([dpo, "save_full_model=true"]) == 0
    rows = [r for r in read_log(tmp_path / "dpo" / "log.jsonl") if "loss" in r]
    # step 0: the policy (SFT folded in + fresh zero adapters) equals the reference (adapters off); had the SFT
    # adapters trained on, "adapters off" would be the base LM and the first loss would not be ln 2
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5
