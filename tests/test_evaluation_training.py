"""`eval_tasks` during training: benchmark scores every `eval_steps` in log.jsonl and TensorBoard."""

import glob
import json

import pytest
from qwenvl_lab.core.config_io import ConfigError
from qwenvl_lab.evaluation.during_training import check_eval_tasks, eval_task_callbacks
from qwenvl_lab.evaluation.to_vqav2 import convert
from qwenvl_lab.trainer.run import train

from tests.tiny_train import make_tiny_data, tiny_train_config


def test_eval_tasks_logged_every_eval_steps(tmp_path):
    data = make_tiny_data(tmp_path / "shapes")
    convert(str(data / "val.jsonl"), tmp_path / "vqav2", image_folder=str(data))
    spec = {"task": "vqav2", "data": str(tmp_path / "vqav2"), "images": str(tmp_path / "vqav2" / "images"),
            "limit": 3, "prompt": "{question}", "max_new_tokens": 3}
    cfg = tiny_train_config(tmp_path, data, eval_tasks=[spec], eval_steps=2, max_steps=4,
                            report_to=["tensorboard"])
    out = train(cfg, callbacks=[eval_task_callbacks]).output_dir
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_vqav2_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["eval_vqav2_accuracy"] <= 1.0 for r in evals)
    res = json.loads((out / "eval_tasks" / "vqav2" / "step-4" / "results.json").read_text())
    assert res["n_items"] == 3 and res["metrics"]["accuracy"] == evals[-1]["eval_vqav2_accuracy"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(str(out / "**" / "events.out.tfevents*"), recursive=True)
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(e)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "eval/vqav2_accuracy" in tags


@pytest.mark.parametrize("overrides, message", [
    ({"eval_tasks": [{"task": "vqav2", "data": "d"}]}, "needs eval_steps"),
    ({"eval_tasks": [{"task": "nope", "data": "d"}], "eval_steps": 2}, "task 'nope'"),
    ({"eval_tasks": [{"task": "pope"}], "eval_steps": 2}, "`data`"),
    ({"eval_tasks": [{"task": "pope", "data": "d", "limt": 3}], "eval_steps": 2}, "unknown key"),
    ({"eval_tasks": [{"task": "vqav2", "data": "d"}], "eval_steps": 2, "fsdp": True}, "does not run with FSDP"),
    ({"eval_tasks": [{"task": "vqav2", "data": "d"}], "eval_steps": 2, "fsdp": "true"}, "does not run with FSDP"),
])
def test_eval_tasks_config_errors(tmp_path, overrides, message):
    data = make_tiny_data(tmp_path / "shapes")
    cfg = tiny_train_config(tmp_path, data, **overrides)
    with pytest.raises(ConfigError, match=message):
        check_eval_tasks(cfg.eval_tasks, cfg.eval_steps, cfg.fsdp, cfg.deepspeed)


def test_eval_tasks_without_their_callbacks_are_refused(tmp_path):
    data = make_tiny_data(tmp_path / "shapes")
    cfg = tiny_train_config(tmp_path, data, eval_tasks=[{"task": "vqav2", "data": "d"}], eval_steps=2)
    with pytest.raises(ConfigError, match="eval_tasks needs the evaluation's callbacks"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_eval_tasks_accept_fsdp_off_as_a_yaml_bool(tmp_path):
    data = make_tiny_data(tmp_path / "shapes")
    cfg = tiny_train_config(tmp_path, data, eval_tasks=[{"task": "vqav2", "data": "d"}], eval_steps=2, fsdp=False)
    check_eval_tasks(cfg.eval_tasks, cfg.eval_steps, cfg.fsdp, cfg.deepspeed)
    assert cfg.fsdp is False and cfg.eval_tasks[0]["task"] == "vqav2"
