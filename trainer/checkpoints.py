"""Finding checkpoints in a run directory.

A checkpoint directory `checkpoint-<step>` counts as complete only when its trainer state is there:
the Trainer writes `trainer_state.json` last, after the weights and the optimizer state.
"""

from __future__ import annotations

import re
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and (path / "model.safetensors").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
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
