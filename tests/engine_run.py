"""Launched by the engine tests under torchrun: a run, then its resume, in one launch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/engine_run.py CONFIG.yaml STEP [key=value ...]

1. trains CONFIG with the overrides exactly as train.py does (same config loading, same `trainer.run.train`);
2. rank 0 copies the run's `checkpoint-STEP` into `<output_dir>_resumed/` (a run directory of its own);
3. trains again into that directory with `resume_from_checkpoint=auto`, in the same processes.

Two trainings in one launch because starting the processes (imports) costs far more than a tiny run here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwenvl_lab.model.train_config import load_train_config  # noqa: E402
from qwenvl_lab.trainer.run import close_process_group, train  # noqa: E402


def main(argv: list[str]) -> int:
    config, step, *overrides = argv
    cfg = load_train_config(config, overrides)
    train(cfg)
    resumed = Path(f"{cfg.output_dir}_resumed")
    if dist.get_rank() == 0:
        shutil.copytree(Path(cfg.output_dir) / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    dist.barrier()
    train(load_train_config(config, [*overrides, f"output_dir={resumed}", "resume_from_checkpoint=auto"]))
    close_process_group(wait_for_others=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
