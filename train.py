"""Train a VLM from a YAML config: `python train.py CONFIG.yaml [key=value ...]`.

Dotted keys set nested fields (`model.projector=mlp3x_gelu`, `lora.r=16`); unknown keys are an error
listing the valid ones. The work happens in `trainer.run`; this file only parses the command line.
"""

import sys

from trainer.config_io import ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Valid top-level keys are the fields of trainer.config.TrainConfig.")
        return 0
    config_path = argv.pop(0) if argv and "=" not in argv[0] else None
    from trainer.config import load_train_config
    from trainer.run import train

    try:
        cfg = load_train_config(config_path, argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except BaseException:
        _close_process_group(wait_for_others=False)  # the other ranks may never reach a barrier
        raise
    _close_process_group(wait_for_others=True)
    return 0


def _close_process_group(wait_for_others: bool) -> None:
    """Under torchrun, leave the process group cleanly: a group torn down by interpreter exit can abort
    a rank ("terminate called without an active exception") after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
