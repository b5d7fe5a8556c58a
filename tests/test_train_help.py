"""`python train.py --help` lists every config key (nested ones dotted) with its default and a description."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qwenvl_lab.core.config_io import describe_fields
from qwenvl_lab.model.config import VLMConfig
from qwenvl_lab.model.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_has_a_description():
    rows = describe_fields(TrainConfig) + describe_fields(VLMConfig, prefix="model.")
    assert {"learning_rate", "lora.r", "lora.targets", "model.lm", "model.chat_template"} <= {k for k, _, _ in rows}
    missing = [k for k, _, note in rows if not note]
    assert not missing, f"config keys without a one-line description (a comment beside the field): {missing}"


def test_help_prints_each_key_default_and_description():
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("  ")}
    for key, default, note in describe_fields(TrainConfig) + describe_fields(VLMConfig, prefix="model."):
        if key == "model":
            continue
        assert key in lines, f"{key} missing from train.py --help"
        assert note[:20] in lines[key] and default[:10] in lines[key], lines[key]
    assert "learning_rate" in lines and "0.0002" in lines["learning_rate"]
