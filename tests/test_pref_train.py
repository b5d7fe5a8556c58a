"""Stage dpo end to end through train.py on a tiny model: pairs from the shapes data (chosen = the right
answer, rejected = another answer of the same question type), the first step's DPO loss is ln 2, trl's metric
names and the held-out evaluation reach log.jsonl, checkpoints carry the reference, a resume continues the
same losses, and the preference keys answer mistakes with one line."""

from __future__ import annotations

import math

import pytest
from qwenvl_lab.trainer.callbacks import read_log

from tests.tiny_pref import METRICS, make_pref_data, pref_config, train_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pref_data(tmp_path_factory.mktemp("shapes"))


_config, _train = pref_config, train_cli


def test_dpo_run_logs_trl_metrics_evaluates_and_resumes(tmp_path, data):
    cfg = _config(tmp_path, data)
    assert _train([cfg]) == 0
    run = tmp_path / "run"
    rows = read_log(run / "log.jsonl")
    train_rows = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train_rows) == [1, 2, 3, 4]
    assert abs(train_rows[1]["loss"] - math.log(2)) < 1e-5  # step 0: policy == reference
    assert abs(train_rows[1]["rewards/margins"]) < 1e-6
    for r in train_rows.values():
        assert set(METRICS) <= set(r)
    assert train_rows[4]["loss"] < math.log(2) - 0.05 and train_rows[4]["rewards/margins"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(set(f"eval_{m}" for m in METRICS) <= set(r) for r in evals)
    assert 0.0 <= evals[-1]["eval_rewards/accuracies"] <= 1.0
    assert (run / "checkpoint-2" / "reference.safetensors").is_file()
    assert (run / "final").is_dir() and (run / "data_report.json").is_file()
    from PIL import Image

    assert Image.open(run / "loss.png").size == (1100, 400)  # the loss panel and the rewards panel

    # resume from step 2 in a second run directory: the same losses at steps 3, 4 (the reference comes back)
    run2 = tmp_path / "run2"
    run2.mkdir()
    import shutil

    shutil.copytree(run / "checkpoint-2", run2 / "checkpoint-2")
    assert _train([cfg, f"output_dir={run2}", "resume_from_checkpoint=auto"]) == 0
    resumed = {r["step"]: r for r in read_log(run2 / "log.jsonl") if "loss" in r}
    for step in (3, 4):
        assert abs(resumed[step]["loss"] - train_rows[step]["loss"]) < 1e-5, step
        assert abs(resumed[step]["rewards/margins"] - train_rows[step]["rewards/margins"]) < 1e-5








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
                  eval_steps=None, max_steps=2, learning_rate=5e-2, save_steps=100, output_dir=str(sft))
    assert _train([cfg]) == 0
    assert (sft / "final" / "lora").is_dir()  # a trainable-only SFT result: its adapters beside the base LM
    capsys.readouterr()  # the SFT run's progress bars
    dpo = _config(tmp_path, data, init_from=str(sft / "final"), model={}, max_steps=1, eval_steps=None,
                  eval_data_path=None, save_steps=100, output_dir=str(tmp_path / "dpo"))
    assert _train([dpo]) == 2  # folding needs a full final model: one line saying so
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: init_from=") and "save_full_model=true" in err
    assert _train([dpo, "save_full_model=true"]) == 0
    rows = [r for r in read_log(tmp_path / "dpo" / "log.jsonl") if "loss" in r]
    # step 0: the policy (SFT folded in + fresh zero adapters) equals the reference (adapters off); had the SFT
    # adapters trained on, "adapters off" would be the base LM and the first loss would not be ln 2
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5
