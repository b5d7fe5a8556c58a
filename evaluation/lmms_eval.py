"""Run lmms-eval with our model registered, without editing lmms-eval; every failure exits non-zero.

    python -m qwenvl_lab.evaluation.lmms_eval --model qwenvl_lab --model_args pretrained=RUN_DIR --tasks TASK \
        [--include_path DIR_OF_LOCAL_TASK_YAMLS] [--batch_size B] [--limit N] [--output_path OUT] ...

Every argument is lmms-eval's own (`lmms-eval --help`). This registers `qwenvl_lab` (the class in
`evaluation/lmms_model.py`) in lmms-eval's model registry and hands the command line to lmms-eval's CLI.
An installed checkout (`pip install -e '.[lmms]'`) also registers it through the `lmms_eval.models`
entry point in pyproject.toml (`manifests` below), so plain `lmms-eval --model qwenvl_lab ...` works too
(but exits 0 whatever happens: lmms-eval's CLI logs an evaluation's exception and carries on).

Exit status (an evaluation command, i.e. not a subcommand such as `tasks` or a `--tasks list` listing):
- 0: every evaluation lmms-eval ran returned results (it prints the table, and writes them under
  `--output_path` when given);
- 2 with one line `error: ...`: a user mistake, checked before lmms-eval's slow task index where it can be
  (no `--model` / `--tasks`, an `--include_path` that is not a folder, a `qwenvl_lab` `pretrained=` that
  holds no model, `llava_hf` left on CUDA on a machine without one or without the `device_map`
  transformers needs, lmms-eval not installed), else taken from the exception lmms-eval would have swallowed:
  an unknown task or another argument lmms-eval refuses, a missing model, data or image file (any
  OSError), one of our UserErrors; or an evaluation that ended without results;
- 1 with the traceback: any other exception (a bug), re-raised after lmms-eval has finished.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from types import TracebackType

import torch

from ..core.cli import run_cli
from ..core.errors import UserError
from ..model.paths import resolve_model_dir

MODEL_ID = "qwenvl_lab"
CLASS_PATH = f"{__package__}.lmms_model.QwenVLLab"
LISTINGS = ("list", "list_groups", "list_tags", "list_subtasks")


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


def is_evaluation(argv: list[str]) -> bool:
    """lmms-eval's flat form (`--model X --tasks Y`) or `eval ...` with arguments; not a subcommand."""
    return bool(argv) and (argv[0].startswith("-") or (argv[0] == "eval" and len(argv) > 1))


def check_arguments(argv: list[str]) -> None:
    """The mistakes that can be told before lmms-eval loads anything (its task index takes 10-60 s)."""
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("--model", "--model_args", "--tasks", "--include_path", "--config", "--device"):
        ap.add_argument(name)
    ap.add_argument("-h", "--help", action="store_true")
    args, _ = ap.parse_known_args(argv[1:] if argv[0] == "eval" else argv)
    if args.help or args.config:
        return  # lmms-eval's help; a config file names the rest
    if not args.tasks:
        raise UserError("lmms-eval: no --tasks given; name tasks (comma-separated) or use --tasks list")
    if args.tasks in LISTINGS:
        return
    if not args.model:
        raise UserError(f"lmms-eval: no --model given; use --model {MODEL_ID} --model_args pretrained=RUN_DIR")
    if args.include_path and not Path(args.include_path).is_dir():
        raise UserError(f"lmms-eval: --include_path {args.include_path} is not a folder (of task YAML files)")
    model_args = dict(kv.split("=", 1) for kv in (args.model_args or "").split(",") if "=" in kv)
    if args.model == MODEL_ID:
        if not model_args.get("pretrained"):
            raise UserError(f"lmms-eval: --model {MODEL_ID} needs --model_args pretrained=RUN_OR_MODEL_DIR")

        resolve_model_dir(model_args["pretrained"])  # a ModelDirError (UserError) names the folder
    else:
        _check_device(args.model, args.device, model_args)


def _check_device(model: str, device: str | None, model_args: dict) -> None:
    """lmms-eval's `llava_hf` (what our llava-hf export runs with) moves itself to `--device` (default cuda)
    and passes `device_map` (default "") to transformers, which refuses "" in one process. Other lmms-eval
    models are left alone (some run anywhere, e.g. the API clients); ours falls back to the CPU by itself."""
    if model != "llava_hf":
        return

    if (device or "cuda").startswith("cuda") and not torch.cuda.is_available():
        extra = " and device_map=cpu to --model_args" if "device_map" not in model_args else ""
        raise UserError(f"lmms-eval: --model {model} runs on {device or 'cuda (the default)'} and this machine has "
                        f"no CUDA device; add --device cpu{extra}")
    if not model_args.get("device_map") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise UserError(f"lmms-eval: --model llava_hf in one process needs device_map={device or 'cuda'} in "
                        f"--model_args (its default '' is refused by transformers)")


def _raised_in(err: BaseException, filename_end: str) -> bool:
    tb: TracebackType | None = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(filename_end)


def user_error_line(err: BaseException) -> str | None:
    """The one line for an exception that is the user's mistake, else None (a bug). An exception raised
    `from` another (lmms-eval retries loading a dataset, then raises tenacity's RetryError from the
    FileNotFoundError) is judged by the first user mistake in its chain of causes."""
    seen: BaseException | None = err
    while seen is not None:
        line = _own_line(seen)
        if line is not None:
            return line
        seen = seen.__cause__
    return None


def _own_line(err: BaseException) -> str | None:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, UserError):
        return text
    if isinstance(err, OSError):  # a file that is not there or not readable; a hub name while offline
        return f"{type(err).__name__}: {text}"
    if isinstance(err, ValueError) and _raised_in(err, "lmms_eval/__main__.py"):  # its argument checks
        if text.startswith("Tasks not found"):
            missing = text.split(":", 1)[1].split(". Try", 1)[0].strip()
            return (f"unknown task(s) {missing}; `--tasks list` (with the same --include_path) lists the "
                    f"known ones")
        return text
    return None


class RunWatch:
    """Wraps lmms-eval's per-evaluation function to keep what each evaluation returned or raised."""

    def __init__(self) -> None:
        self.runs: list[tuple[object, BaseException | None]] = []  # (results or None, exception or None)

    def __enter__(self) -> RunWatch:
        import lmms_eval.__main__ as cli

        self._cli, self._original = cli, cli.cli_evaluate_single

        def watched(args):
            try:
                results, samples = self._original(args)
            except Exception as e:  # lmms-eval would print it and exit 0; it is raised after the run instead
                self.runs.append((None, e))
                return None, None
            self.runs.append((results, None))
            return results, samples

        cli.cli_evaluate_single = watched
        return self

    def __exit__(self, *exc) -> None:
        self._cli.cli_evaluate_single = self._original

    def check(self, rank: int) -> None:
        """Raise the first failure: a UserError for a user's mistake, the exception itself for a bug."""
        for results, err in self.runs:
            if err is not None:
                line = user_error_line(err)
                if line is None:
                    raise err
                raise UserError(f"lmms-eval: {line}") from err
            if results is None and rank == 0:
                raise UserError("lmms-eval: the evaluation ended without results (see the log above); "
                                "nothing was scored")


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import lmms_eval  # noqa: F401  (optional dependency)
    except ImportError:
        raise UserError("lmms-eval is not installed; pip install -c constraints.txt '.[lmms]' (see README, "
                        "Evaluate)") from None
    evaluating = is_evaluation(argv)
    if evaluating:
        check_arguments(argv)
    register()
    from lmms_eval.cli.dispatch import main as lmms_main

    sys.argv = ["lmms-eval", *argv]
    watch = RunWatch() if evaluating else None
    with watch or contextlib.nullcontext():
        lmms_main()
    if watch is not None:
        watch.check(_rank())
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
