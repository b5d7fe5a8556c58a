"""Merge LoRA adapters into the LM and write a standalone model.

    python -m qwenvl_lab.model.merge --src RUN_OR_MODEL_DIR --dst DIR

The result holds every weight (no adapters, no pointer to a base checkpoint for trained parts) and loads
with `VLM.from_pretrained(DIR)`; it gives the same logits as the adapter model it came from. A missing
source, a directory without a model or an unwritable destination ends with one line `error: ...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.cli import run_cli, writable_dir
from .paths import resolve_model_dir


def merge(src: str | Path, dst: str | Path) -> Path:
    from .model import load_vlm  # heavy (torch, transformers): after the paths are checked in main

    vlm = load_vlm(resolve_model_dir(src))
    vlm.merge_lora()
    vlm.save_pretrained(dst, trainable_only=False)
    return Path(dst)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Merge LoRA adapters into the LM; write a standalone model.")
    ap.add_argument("--src", required=True, help="run directory or saved model directory")
    ap.add_argument("--dst", required=True)
    args = ap.parse_args(argv)
    resolve_model_dir(args.src)  # a bad source fails before the destination is made
    writable_dir(args.dst, "--dst")
    out = merge(args.src, args.dst)
    print(f"merged {args.src} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
