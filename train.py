"""Train a VLM from a YAML config: `python train.py CONFIG.yaml [key=value ...]`.

Dotted keys set nested fields (`model.projector=mlp3x_gelu`, `lora.r=16`); unknown keys are an error
listing the valid ones. The work happens in `trainer.run`; this file only parses the command line.
A mistake in the config, the data or a path ends with one line `error: ...` (exit status 2); `--debug`
shows the traceback. `python train.py --check CONFIG.yaml [key=value ...]` checks the config and its paths
only (what train.sh does once before it launches several processes; WORLD_SIZE sets the process count).
The BigBro repo's train.sh flags (`--lora_rank 128 --feature_proj_lr 1e-4 --image_map ... --output_dir ...`)
are accepted as aliases of our keys, each saying how it is spelt here (dataprocess/bigbro.py); `init_from` may
name one of its checkpoints.
"""

import sys

# Light modules only (no torch): `--help` and `--check` answer before the heavy imports in `main`.
from qwenvl_lab.core.cli import run_cli
from qwenvl_lab.core.config_io import describe_fields
from qwenvl_lab.dataprocess.bigbro import resolve_init_from, train_argv
from qwenvl_lab.model.config import VLMConfig
from qwenvl_lab.model.train_config import TrainConfig, check_paths, load_train_config


def usage() -> str:
    rows = describe_fields(TrainConfig) + describe_fields(VLMConfig, prefix="model.")
    width = max(len(k) for k, _, _ in rows)
    lines = [__doc__.strip(), "", "usage: python train.py [--check] CONFIG.yaml [key=value ...] [--debug]", "",
             "Config keys (default, then what it does; `model.*` keys override the preset's):"]
    for key, default, note in rows:
        if key == "model":
            continue  # its keys follow as model.*
        lines.append(f"  {key:<{width}}  {default[:30]:<30}  {note}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    argv = train_argv(argv)  # the BigBro repo's --flags -> our key=value (a line each); others unchanged
    check_only = bool(argv) and argv[0] == "--check"
    if check_only:
        argv = argv[1:]
    config_path = argv.pop(0) if argv and "=" not in argv[0] else None
    cfg = load_train_config(config_path, argv)
    callbacks = []
    if cfg.eval_tasks:  # benchmarks every eval_steps: the evaluation package's callbacks (loaded only when used)
        from qwenvl_lab.evaluation.during_training import check_eval_tasks, eval_task_callbacks

        check_eval_tasks(cfg.eval_tasks, cfg.eval_steps, cfg.fsdp, cfg.deepspeed)
        callbacks.append(eval_task_callbacks)
    cfg = resolve_init_from(cfg)  # a BigBro checkpoint: converted once
    check_paths(cfg)  # before trainer.run (~10 s to import) and the model load: a wrong path fails fast
    if check_only:  # train.sh runs this once before torchrun starts N processes that would each fail alike
        return 0
    from qwenvl_lab.trainer.run import (  # heavy: after the config and its paths are checked
        close_process_group,
        train,
    )

    try:
        train(cfg, callbacks=callbacks)
    except BaseException:
        close_process_group(wait_for_others=False)  # the other ranks may never reach a barrier
        raise
    close_process_group(wait_for_others=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
