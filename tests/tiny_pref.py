"""Stage-dpo test data and runs: preference pairs from the shapes data (chosen = the right answer, rejected = another
answer given to the same question type) and a tiny stage-dpo config; holds no test."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from qwenvl_lab.core.cli import run_cli

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


def make_pref_data(root: Path) -> Path:
    """The shapes data plus pref_train.jsonl (8 pairs, RLAIF-V layout) and pref_val.jsonl (LLaMA-Factory pairs)."""
    root = make_tiny_data(root)
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


def pref_config(tmp_path: Path, data: Path, **overrides) -> str:
    """A stage-dpo YAML for a few-step run on the tiny model; returns its path."""
    model = dict(tiny_model_section(data), freeze_towers=True)
    cfg = {"model": model, "stage": "dpo", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "data_path": [str(data / "pref_train.jsonl")], "eval_data_path": [str(data / "pref_val.jsonl")],
           "image_folder": str(data), "max_length": 160, "learning_rate": 5e-2, "warmup_ratio": 0.0,
           "lr_scheduler_type": "constant", "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
           "max_steps": 4, "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "precision": "fp32",
           "report_to": [], "output_dir": str(tmp_path / "run"), "beta": 0.5, "group_by_length": False}
    cfg.update(overrides)
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train_cli(argv: list[str]) -> int:
    """train.py as the command line runs it (exit status)."""
    return run_cli(entry("train").main, argv)
