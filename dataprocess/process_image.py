"""Resize / pad / crop a folder of images into a cache folder with several worker processes.

Every image under `src` (by extension, recursively) is loaded with `image_io.load_rgb` (EXIF
orientation, any mode -> RGB, a pixel limit), made `size` x `size` by `image_io.square` (`pad` in a
given or the CLIP mean colour, `resize`, or `crop`), and written to the same relative path under
`dst` (same extension, so the JSONL image paths stay valid with the cache as the image folder).
An output newer than its input is up to date and skipped, so an interrupted run resumes. Outputs are
written to a temporary name and renamed, so a killed run never leaves a half-written "up-to-date" file.

An unreadable file is reported, not fatal: the run processes the rest, then prints the count and the
list of failures (and writes them to `dst/failed.txt`). The exit code is 0 unless `--strict` is given
and something failed.

    python -m qwenvl_lab.dataprocess.process_image data/coco/train2017 cache/coco336 --size 336 --mode pad --workers 8
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

from ..core.cli import run_cli
from .common import SourceError
from .image_io import DEFAULT_MAX_PIXELS, MODES, ImageError, load_rgb, parse_fill, square

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FAILED_LIST = "failed.txt"


@dataclass
class Job:
    src_root: str
    dst_root: str
    size: int
    mode: str
    fill: tuple[int, int, int]
    max_pixels: int
    quality: int


@dataclass
class Summary:
    written: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def list_images(root: str | Path) -> list[str]:
    """Relative POSIX paths of image files under `root`, sorted (so runs are reproducible)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder (give the folder of images to process)")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _save_format(rel: str) -> str:
    fmt = Image.registered_extensions().get(Path(rel).suffix.lower())
    assert fmt, f"{rel}: no PIL writer for this extension"
    return fmt


def process_one(job: Job, rel: str) -> tuple[str, str, str]:
    """Process one file -> (rel, status, reason); status is 'written', 'up_to_date' or 'failed'."""
    src = os.path.join(job.src_root, rel)
    dst = os.path.join(job.dst_root, rel)
    try:
        if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
            return rel, "up_to_date", ""
        img = square(load_rgb(src, job.max_pixels), job.size, job.mode, job.fill)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        tmp = f"{dst}.tmp{os.getpid()}"
        fmt = _save_format(rel)
        kwargs = {"quality": job.quality} if fmt in ("JPEG", "WEBP") else {}
        try:
            img.save(tmp, format=fmt, **kwargs)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return rel, "written", ""
    except ImageError as e:
        return rel, "failed", str(e)
    except Exception as e:  # a failure on one file (disk, odd format) must not kill the pool
        return rel, "failed", f"{src}: {type(e).__name__}: {e}"


def _run(args: tuple[Job, str]) -> tuple[str, str, str]:
    return process_one(*args)


def process_folder(src: str | Path, dst: str | Path, size: int = 336, mode: str = "pad",
                   fill: tuple[int, int, int] = (122, 116, 104), workers: int = 1,
                   max_pixels: int = DEFAULT_MAX_PIXELS, quality: int = 95) -> Summary:
    """Process every image under `src` into `dst`; returns what was written, skipped and failed."""
    if mode not in MODES:
        raise SourceError(f"unknown mode {mode!r}; choose from {MODES}")
    src_abs, dst_abs = Path(src).resolve(), Path(dst).resolve()
    if dst_abs == src_abs or src_abs in dst_abs.parents:
        # outputs inside the source would be picked up as inputs by the next run
        raise SourceError(f"{dst}: the cache folder must differ from, and not lie inside, the source folder")
    job = Job(str(src), str(dst), size, mode, tuple(fill), max_pixels, quality)
    rels = list_images(src)
    tasks = [(job, rel) for rel in rels]
    if workers <= 1:
        results = [_run(t) for t in tasks]
    else:
        with Pool(workers) as pool:
            # chunks amortise the inter-process overhead; imap keeps the input order in the result
            results = list(pool.imap(_run, tasks, chunksize=max(1, min(64, len(tasks) // (4 * workers)))))
    summary = Summary()
    for rel, status, reason in results:
        if status == "written":
            summary.written.append(rel)
        elif status == "up_to_date":
            summary.up_to_date.append(rel)
        else:
            summary.failed.append((rel, reason))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.dataprocess.process_image", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="folder of source images (searched recursively)")
    ap.add_argument("dst", help="cache folder; relative paths are kept")
    ap.add_argument("--size", type=int, default=336, help="output side in pixels")
    ap.add_argument("--mode", default="pad", choices=MODES, help="pad to square | resize | centre crop")
    ap.add_argument("--pad-colour", default="mean", help="mean (CLIP mean), white, black or R,G,B")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="worker processes")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    ap.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    ap.add_argument("--strict", action="store_true", help="exit with code 1 if any file failed")
    args = ap.parse_args(argv)
    s = process_folder(args.src, args.dst, args.size, args.mode, parse_fill(args.pad_colour), args.workers,
                       args.max_pixels, args.quality)
    print(f"written {len(s.written)}, up to date {len(s.up_to_date)}, failed {len(s.failed)}")
    (Path(args.dst) / FAILED_LIST).unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    if s.failed:
        lines = [f"{rel}\t{reason}" for rel, reason in s.failed]
        Path(args.dst).mkdir(parents=True, exist_ok=True)
        (Path(args.dst) / FAILED_LIST).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"failed files ({len(s.failed)}), also listed in {Path(args.dst) / FAILED_LIST}:", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
    return 1 if (args.strict and s.failed) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
