"""Evaluate a model on a standard benchmark read from its released files.

    python -m qwenvl_lab.evaluation --model RUN_OR_MODEL_DIR --task NAME --data PATH [--images DIR] [--limit N]
        [--batch-size B] --output DIR [--annotations FILE] [--split NAME] [--prompt TEMPLATE]
        [--mc-mode generate|likelihood] [--no-circular] [--max-new-tokens N]
    python -m qwenvl_lab.evaluation --list-tasks

Writes `DIR/answers.jsonl` (appended as answers come; a rerun skips what is there), `DIR/results.json`
and `DIR/results.png`, and prints a per-category table. A user mistake (unknown task, a missing file or
one not in the benchmark's format, no model in the folder) is one line on stderr and exit status 2; so
is a run that answered no question (no questions, every image missing: the line names the image folder
and how many were missing there), after the table and results.json are written.
"""

from __future__ import annotations

import argparse

from ..core.cli import run_cli, writable_dir
from ..core.errors import UserError
from ..model.paths import resolve_model_dir
from .report import format_table
from .runner import MC_MODES, check_answered, run_task
from .tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.evaluation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="run directory (its final/ or newest checkpoint) or model directory")
    ap.add_argument("--task", help=f"one of: {', '.join(sorted(TASKS))}")
    ap.add_argument("--data", help="the benchmark's released file (or its folder)")
    ap.add_argument("--images", default=None, help="image folder (default: per task, beside the data)")
    ap.add_argument("--annotations", default=None, help="VQAv2 annotations JSON (default: found beside --data)")
    ap.add_argument("--split", default=None, help="ScienceQA / Karpathy split (default test)")
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--output", help="folder for answers.jsonl, results.json, results.png")
    ap.add_argument("--prompt", default=None, help="prompt template with {question} (default: LLaVA-1.5's wording)")
    ap.add_argument("--mc-mode", default="generate", choices=MC_MODES,
                    help="multiple choice: generate a letter, or pick the most likely option text")
    ap.add_argument("--no-circular", action="store_true", help="MMBench: one round instead of circular evaluation")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--list-tasks", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list_tasks:
        for name in sorted(TASKS):
            print(f"{name:<10} {TASKS[name].about}")
        return 0
    missing = [f"--{k}" for k in ("model", "task", "data", "output") if getattr(args, k) is None]
    if missing:
        raise UserError(f"evaluation: missing {' '.join(missing)} (see --help)")
    if args.task not in TASKS:
        raise UserError(f"evaluation: unknown task {args.task!r}; choose one of {', '.join(sorted(TASKS))}")
    if args.prompt is not None and "{question}" not in args.prompt and TASKS[args.task].kind != "caption":
        raise UserError(f"evaluation: --prompt {args.prompt!r} has no {{question}} placeholder")
    model_dir = resolve_model_dir(args.model)
    writable_dir(args.output, "--output")
    import torch  # heavy: after the arguments are checked

    from ..model import VLM
    weights = sorted(model_dir.glob("*.safetensors"))
    model_id = f"{model_dir.resolve()}@{max((w.stat().st_mtime_ns for w in weights), default=0)}"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vlm = VLM.from_pretrained(model_dir).to(device).eval()
    options = {k: v for k, v in (("annotations", args.annotations), ("split", args.split)) if v is not None}
    if args.no_circular:
        options["circular"] = False
    results = run_task(vlm, args.task, args.data, images=args.images, output=args.output, limit=args.limit,
                       batch_size=args.batch_size, prompt=args.prompt, mc_mode=args.mc_mode,
                       max_new_tokens=args.max_new_tokens, options=options, model_id=model_id)
    print(format_table(results))
    print(f"answers, results.json and results.png in {args.output}")
    check_answered(results)  # nothing answered (every image missing, ...) is a failure, not a score of 0
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
