"""A process start prints what the user needs once, and no third-party noise.

* bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (AVX512-BF16 CPUs) and
  DeepSpeed's "Setting accelerator to CPU" are dropped in a fresh process that starts like our entry points
  (`core.cli.run_cli`) and loads bitsandbytes and DeepSpeed the way our code does; our own warnings (a
  project logger, `warnings.warn`) and other messages of those loggers still print. The messages are also
  emitted by hand, so the check holds on a CPU where bitsandbytes stays quiet by itself;
* a train.py run prints the optimizer groups once.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tiny_train import make_tiny_data, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
BNB_NOISE = "Failed to load CPU gemm_4bit_forward from kernels-community"
DS_NOISE = "Setting accelerator to CPU."

# Emits both noise messages (as the libraries word them) and messages that must survive.
EMIT = textwrap.dedent(f"""
    import logging, warnings
    import deepspeed.utils  # DeepSpeed's logger and its stdout handler
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("{BNB_NOISE}: %s. Please make sure", "x")
    logging.getLogger("DeepSpeed").warning("{DS_NOISE} If you have GPU or other accelerator, ...")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("planted: another bitsandbytes warning")
    logging.getLogger("DeepSpeed").warning("planted: another DeepSpeed warning")
    logging.getLogger("qwenvl_lab.model.quant").warning("planted: a warning of ours (logger)")
    warnings.warn("planted: a warning of ours (warnings)")
""")

# The way our entry points start: core.cli first, then bitsandbytes (model.quant, for QLoRA) and
# DeepSpeed (trainer.engines; the Trainer's accelerator detection) inside run_cli's main.
ENTRY = textwrap.dedent("""
    import sys
    from qwenvl_lab.core.cli import run_cli

    def main(argv):
        from qwenvl_lab.model.quant import _bnb
        from qwenvl_lab.trainer.engines import prepare_deepspeed_on_cpu
        _bnb()
        prepare_deepspeed_on_cpu()
        from deepspeed.accelerator import get_accelerator
        get_accelerator()
        exec(EMIT)

    sys.exit(run_cli(main))
""")


def _python(code: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _require(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed (make setup installs it)")


def test_third_party_noise_is_dropped_and_our_warnings_stay():
    _require("bitsandbytes", "deepspeed")
    plain = _python(EMIT)  # no project module loaded: the noise prints
    assert BNB_NOISE in plain and DS_NOISE in plain, plain

    out = _python(f"EMIT = {EMIT!r}\n{ENTRY}")
    assert BNB_NOISE not in out and DS_NOISE not in out, out
    for kept in ("another bitsandbytes warning", "another DeepSpeed warning", "a warning of ours (logger)",
                 "a warning of ours (warnings)"):
        assert f"planted: {kept}" in out, (kept, out)


def test_library_use_starts_quiet_too():
    """`from qwenvl_lab.model import VLM` (a notebook, no entry point) gets the same filters."""
    _require("bitsandbytes", "deepspeed")
    out = _python(f"from qwenvl_lab.model import VLM\nfrom qwenvl_lab.model.quant import _bnb\n_bnb()\n{EMIT}")
    assert BNB_NOISE not in out and DS_NOISE not in out, out
    assert "planted: another bitsandbytes warning" in out and "planted: a warning of ours (logger)" in out, out


def test_train_run_prints_optimizer_groups_once(tmp_path):
    _require("peft")
    data = make_tiny_data(tmp_path / "data")
    cfg = tiny_train_config(tmp_path, data, stage="sft", vision_lr=0.0, max_steps=1,
                            lora={"r": 4, "alpha": 8, "dropout": 0.0})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "train.py", str(tmp_path / "tiny_config.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert (Path(cfg.output_dir) / "final").is_dir()
    assert out.count("optimizer groups:") == 1, out
    for group in ("projector", "projector_no_decay", "lm"):  # the groups of a LoRA sft run
        lines = re.findall(rf"(?<!\w){group}\s+lr=", out)  # any listing of the group, in any format
        assert len(lines) == 1, (group, out)
    assert BNB_NOISE not in out and DS_NOISE not in out, out
