"""Faults: SIGKILL during a save then resume, NaN steps, an unwritable or too-full output directory.

The killed run is a real subprocess (`python train.py`): it pauses inside the save of checkpoint-4
(`QWENVL_DEBUG_SAVE_PAUSE`, after the weights and optimizer state are written) and is SIGKILLed there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from qwenvl_lab.core.errors import UserError
from qwenvl_lab.trainer.callbacks import read_log
from qwenvl_lab.trainer.checkpoints import is_complete, latest_checkpoint, stale_tmp_dirs
from safetensors.torch import load_file

from tests.tiny_train import make_tiny_data, run_losses, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("shapes"))


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_save_then_resume_reproduces_losses(tmp_path, data):
    from qwenvl_lab.trainer.run import train

    common = dict(max_steps=6, save_steps=2, save_total_limit=None)
    reference = train(tiny_train_config(tmp_path / "ref", data, **common)).output_dir

    cfg = tiny_train_config(tmp_path / "killed", data, **common)
    run = Path(cfg.output_dir)
    env = dict(os.environ, QWENVL_DEBUG_SAVE_PAUSE="4:120", OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    with open(tmp_path / "killed.out", "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), str(tmp_path / "killed" / "tiny_config.yaml")],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while time.time() < deadline and proc.poll() is None:
                tmp = [d for d in stale_tmp_dirs(run) if d.name.startswith("checkpoint-4.")]
                if tmp and (tmp[0] / "rng_state_0.json").is_file():
                    break  # inside the pause: weights, optimizer and RNG written, trainer state not yet
                time.sleep(0.2)
            else:
                pytest.fail("never reached the save of checkpoint-4: " + (tmp_path / "killed.out").read_text()[-2000:])
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # The half-written checkpoint is invisible; the previous one is complete and is what `auto` picks.
    assert not (run / "checkpoint-4").exists()
    assert is_complete(run / "checkpoint-2")
    assert latest_checkpoint(run) == run / "checkpoint-2"
    half = stale_tmp_dirs(run)
    assert half
    from qwenvl_lab.trainer.run import resolve_resume

    with pytest.raises(UserError, match="unfinished checkpoint"):
        resolve_resume(tiny_train_config(tmp_path / "x", data, resume_from_checkpoint=str(half[0])), run)

    train(tiny_train_config(tmp_path / "killed", data, resume_from_checkpoint="auto", **common))
    assert not stale_tmp_dirs(run)  # cleaned at the start of the resumed run
    a, b = run_losses(reference), run_losses(run)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):  # written by the resumed run
        assert a[step] == b[step], (step, a[step], b[step])
    assert _same(_weights(reference / "final"), _weights(run / "final"))


def test_nan_step_is_skipped_and_counted(tmp_path, data):
    import json

    from qwenvl_lab.trainer.run import train

    result = train(tiny_train_config(tmp_path, data, max_steps=4, save_steps=1, save_total_limit=3,
                                     debug_inject_nan_steps=[3]))
    run = result.output_dir
    assert result.nan_steps == [3]
    # Rotation still works with atomic saves: the oldest of four is gone, no temporary directory is left.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    w2, w3, w4 = (_weights(run / f"checkpoint-{s}") for s in (2, 3, 4))
    assert _same(w2, w3), "the NaN step changed the weights"
    assert not _same(w3, w4), "the step after the NaN one did not train"
    assert all(torch.isfinite(t).all() for t in w4.values())
    o2 = load_file(str(run / "checkpoint-2" / "optimizer_state.safetensors"))
    o3 = load_file(str(run / "checkpoint-3" / "optimizer_state.safetensors"))
    assert _same(o2, o3), "the NaN step changed the AdamW moments"
    rows = {r["step"]: r for r in read_log(run / "log.jsonl") if "loss" in r}
    assert "nan_steps_skipped" not in rows[2] and rows[3]["nan_steps_skipped"] == 1
    assert rows[4]["nan_steps_skipped"] == 1  # a running count
    losses = torch.tensor([rows[s]["loss"] for s in (1, 2, 3, 4)])
    assert torch.isnan(losses[2]) and torch.isfinite(losses[[0, 1, 3]]).all()  # the skipped step says so
    report = json.loads((run / "data_report.json").read_text())
    assert report["nan_steps_skipped"] == 1 and report["nan_steps"] == [3]


def test_too_many_nan_steps_stop_with_a_usable_checkpoint(tmp_path, data):
    from qwenvl_lab.trainer.run import TrainingAborted, train

    cfg = tiny_train_config(tmp_path, data, max_steps=8, save_steps=1, save_total_limit=None,
                            debug_inject_nan_steps=[2, 3, 4], max_consecutive_nan=2)
    with pytest.raises(TrainingAborted, match=r"max_consecutive_nan=2.*checkpoint-3.*resume_from_checkpoint=auto"):
        train(cfg)
    run = Path(cfg.output_dir)
    assert latest_checkpoint(run) == run / "checkpoint-3" and not (run / "final").exists()
    assert _same(_weights(run / "checkpoint-1"), _weights(run / "checkpoint-3"))
    # The run continues from it once the cause is gone.
    result = train(tiny_train_config(tmp_path, data, max_steps=5, save_steps=100, resume_from_checkpoint="auto"))
    assert sorted(run_losses(result.output_dir))[-2:] == [4, 5] and result.nan_steps == []


def test_unwritable_output_dir_fails_before_building_anything(tmp_path, data, monkeypatch):
    import qwenvl_lab.trainer.run as run_mod

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # works as root too: nothing can be created under a file
    built = []
    monkeypatch.setattr(run_mod, "build_model", lambda cfg: built.append(cfg))
    cfg = tiny_train_config(tmp_path, data, output_dir=str(blocker / "run"))
    with pytest.raises(UserError, match=r"output_dir .*a_file/run cannot be made: .*a_file is not a directory"):
        run_mod.train(cfg)
    assert built == []


def test_full_disk_fails_before_the_first_step(tmp_path, data, monkeypatch):
    import qwenvl_lab.trainer.run as run_mod
    from qwenvl_lab.trainer.hf_trainer import VLMTrainer

    started = []
    monkeypatch.setattr(VLMTrainer, "train", lambda self, **kw: started.append(1))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_mod.shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 4096))
    with pytest.raises(UserError, match=r"MiB free on its disk.*check_disk_space=false"):
        run_mod.train(tiny_train_config(tmp_path, data))
    assert started == []


def test_checkpoint_size_estimate_covers_a_real_checkpoint(tmp_path, data):
    from qwenvl_lab.trainer.run import checkpoint_bytes, train

    result = train(tiny_train_config(tmp_path, data, max_steps=1, save_steps=1))
    ckpt = result.output_dir / "checkpoint-1"
    tensor_files = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    estimate = checkpoint_bytes(result.model)
    assert tensor_files * 0.9 <= estimate <= tensor_files * 1.5, (estimate, tensor_files)
