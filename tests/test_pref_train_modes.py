"""Stage dpo through train.py, the run modes: precomputed reference log-probs, gradient accumulation over pairs,
and the other losses (ipo, simpo; orpo shares simpo's reference-free path and is held to trl in
tests/test_pref_loss.py). The data and config helpers are tests/tiny_pref.py's."""

from __future__ import annotations

import json
import math

import pytest
from qwenvl_lab.trainer.callbacks import read_log

from tests.tiny_pref import make_pref_data, pref_config, train_cli

_config, _train = pref_config, train_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pref_data(tmp_path_factory.mktemp("shapes"))


def test_precomputed_reference_logps_give_the_same_run(tmp_path, data, monkeypatch):
    from qwenvl_lab.model.preference import Reference

    passes = []
    active = Reference.active
    monkeypatch.setattr(Reference, "active", lambda self: passes.append(1) or active(self))
    logs, n_passes = {}, {}
    for pre in (False, True):
        out = tmp_path / f"run_{pre}"
        cfg = _config(tmp_path, data, output_dir=str(out), max_steps=2, save_steps=100, precompute_ref_logps=pre)
        passes.clear()
        assert _train([cfg]) == 0
        n_passes[pre] = len(passes)
        logs[pre] = {(r["step"], "loss" in r): r for r in read_log(out / "log.jsonl") if "loss" in r or "eval_loss" in r}
    table = json.loads((tmp_path / "run_True" / "reference_logps.json").read_text())
    assert len(table["train"]) == 8 and len(table["eval"]) == 4  # by pair id: "0".."7" (RLAIF-V idx), file#line
    assert set(table["train"]) == {str(i) for i in range(8)}
    assert not (tmp_path / "run_False" / "reference_logps.json").exists()
    assert n_passes == {False: 3, True: 2}  # a reference pass per step + the eval batch; once per dataset
    assert len(logs[False]) == 3  # 2 train rows and one evaluation
    for at, row in logs[False].items():
        for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins"):
            if key in row:
                assert abs(logs[True][at][key] - row[key]) < 1e-5, (at, key)


def test_gradient_accumulation_keeps_the_mean_over_pairs(tmp_path, data):
    losses = {}
    for bs, ga in ((8, 1), (4, 2)):
        out = tmp_path / f"run_{ga}"
        cfg = _config(tmp_path, data, output_dir=str(out), max_steps=2, eval_steps=None, eval_data_path=None,
                      save_steps=100, per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        assert _train([cfg]) == 0
        losses[ga] = [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert len(losses[1]) == 2 and abs(losses[1][0] - math.log(2)) < 1e-5
    assert abs(losses[1][1] - losses[1][0]) > 1e-3  # the first step did change the model
    for a, b in zip(losses[1], losses[2]):  # every step sees the 8 pairs, as 1 x 8 or 2 x 4
        assert abs(a - b) < 1e-5, (losses[1], losses[2])


@pytest.mark.parametrize("kind", ["ipo", "simpo"])
def test_other_losses_train(tmp_path, data, kind):
    cfg = _config(tmp_path, data, pref_loss=kind, max_steps=1, eval_steps=None, eval_data_path=None,
                  save_steps=100)
    assert _train([cfg]) == 0
    rows = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert len(rows) == 1 and all(math.isfinite(r["loss"]) and "rewards/accuracies" in r for r in rows)
    if kind == "ipo":  # step 0: every log-ratio is 0, the loss is (1 / (2 beta))^2
        assert abs(rows[0]["loss"] - (1 / (2 * 0.5)) ** 2) < 1e-5
