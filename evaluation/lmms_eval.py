"""Run lmms-eval with our model registered, without editing lmms-eval.

    python -m evaluation.lmms_eval --model qwenvl_lab --model_args pretrained=RUN_DIR --tasks TASK \
        [--include_path DIR_OF_LOCAL_TASK_YAMLS] [--batch_size B] [--limit N] [--output_path OUT] ...

Every argument is lmms-eval's own (`lmms-eval --help`). This registers `qwenvl_lab` (the class in
`evaluation/lmms_model.py`) in lmms-eval's model registry and hands the command line to lmms-eval's CLI.
An installed checkout (`pip install -e '.[lmms]'`) also registers it through the `lmms_eval.models`
entry point in pyproject.toml (`manifests` below), so plain `lmms-eval --model qwenvl_lab ...` works too.
Without lmms-eval installed: one line saying how to install it, exit status 2.
"""

from __future__ import annotations

import sys

from dataset.sample import UserError
from trainer.cli import run_cli

MODEL_ID = "qwenvl_lab"
CLASS_PATH = "evaluation.lmms_model.QwenVLLab"


def manifests():
    """Our model's manifest for lmms-eval's registry (also the entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


def register() -> None:
    """Add `qwenvl_lab` to lmms-eval's model registry of this process."""
    from lmms_eval.models import AVAILABLE_MODELS, MODEL_REGISTRY_V2

    for manifest in manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
        AVAILABLE_MODELS[manifest.model_id] = CLASS_PATH.rsplit(".", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import lmms_eval  # noqa: F401  (optional dependency)
    except ImportError:
        raise UserError("lmms-eval is not installed; pip install -c constraints.txt '.[lmms]' (see README, "
                        "Evaluate)") from None
    register()
    from lmms_eval.cli.dispatch import main as lmms_main

    sys.argv = ["lmms-eval", *argv]
    lmms_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
