"""Finding checkpoints in a run directory, and the names used to write them atomically.

A checkpoint is written into `checkpoint-<step>.tmp-<random>` and renamed to `checkpoint-<step>` only
when every file is in it (see `VLMTrainer._save_checkpoint`), so a directory named `checkpoint-<step>`
is complete unless it predates that scheme. `is_complete` still checks the files the Trainer writes
last (`trainer_state.json`) and the weights. A `.tmp-` directory is the trace of a run killed while
saving: never resumed from, removed by `remove_stale_tmp` at the next start. The final model is
staged the same way (`final.tmp-XXXX` -> `final`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^(checkpoint-\d+|final)\.tmp-\w+$")
TMP_MARK = ".tmp-"


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and (path / "model.safetensors").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and half-written directories are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def make_tmp_dir(run_dir: str | Path, name: str) -> Path:
    """A fresh `name.tmp-XXXX` in `run_dir`, with the usual directory permissions (mkdtemp's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix=name + TMP_MARK, dir=run_dir))
    path.chmod(0o755)
    return path


def stale_tmp_dirs(run_dir: str | Path) -> list[Path]:
    """Leftovers of saves that never finished (`checkpoint-N.tmp-XXXX`, `final.tmp-XXXX`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and _TMP.match(p.name))


def remove_stale_tmp(run_dir: str | Path) -> list[Path]:
    """Delete unfinished checkpoint directories; returns what was removed. Call before training starts
    (never while a save may be running)."""
    removed = stale_tmp_dirs(run_dir)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
