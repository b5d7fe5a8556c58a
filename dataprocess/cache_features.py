"""Run the frozen vision tower(s) once per unique image and cache their output for stage 1.

    python -m qwenvl_lab.dataprocess.cache_features --model MODEL_OR_RUN_DIR --data FILE.jsonl [FILE2.jsonl ...] \
        --image-folder DIR --out CACHE_DIR [--batch-size 32] [--shard-images 1024]

`--model` is a VLM directory (or a run directory: its `final/` or newest checkpoint); only its towers
run. Every image named by the data files (resolved as the dataset resolves it) is decoded and
preprocessed exactly as `VLMDataset` does, passed through the towers (eval mode, no_grad, the model's
tower dtype), and its output BEFORE the projector, `[num_tokens, C]`, is written to safetensors shards
plus the index `feature_cache.json` (format: `dataset/feature_cache.py`), which stores the towers'
identity so that training with another tower refuses the cache. The index is written last, so an
interrupted run leaves no usable-looking cache. Unreadable images and bad records are skipped and
counted (training then skips the samples that need them).

Then train with `feature_cache=CACHE_DIR` (frozen towers only): no image is decoded and the towers
do not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.cli import run_cli
from ..core.errors import UserError
from ..dataset.feature_cache import FORMAT, INDEX_FILE, image_key, tower_identity
from ..dataset.formats import normalize, read_records
from ..dataset.images import MAX_PIXELS, load_image
from ..dataset.sample import BadSampleError
from ..model.paths import resolve_model_dir

log = logging.getLogger(__name__)


def unique_images(data_paths: list[str], image_folder: str | None, allow_absolute_paths: bool = True
                  ) -> tuple[list[str], list[str]]:
    """Every image path the data files name (first appearance order, deduplicated) and the problems met."""
    seen: dict[str, None] = {}
    problems: list[str] = []
    for path in data_paths:
        bad: list = []
        for pos, rec in read_records(path, bad):
            try:
                sample = normalize(rec, pos, path, image_folder=image_folder,
                                   allow_absolute_paths=allow_absolute_paths)
            except BadSampleError as e:
                problems.append(str(e))
                continue
            for img in sample.images:
                seen.setdefault(img, None)
        problems += [str(e) for _, e in bad]
    return list(seen), problems


def _save_shard(out: Path, shard_idx: int, tensors: dict[str, torch.Tensor]) -> str:
    name = f"features-{shard_idx:05d}.safetensors"
    save_file(tensors, str(out / name))
    return name


@torch.no_grad()
def cache_features(vlm, data_paths: list[str], image_folder: str | None, out: str | os.PathLike,
                   batch_size: int = 32, shard_images: int = 1024, allow_absolute_paths: bool = True,
                   max_pixels: int = MAX_PIXELS) -> dict:
    """Write the cache of `vlm.towers`' outputs for every image in `data_paths`; returns a summary."""
    res = getattr(vlm, "resolution", None)
    if res is not None and res.variable:
        raise UserError(f"feature cache: the model reads images at their own size ({res.mode} resolution), so a "
                        f"tower output is not one fixed [tokens, C] per image; train from the images instead "
                        f"(no feature_cache)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_FILE).exists():
        (out / INDEX_FILE).unlink()  # an old index must never describe new shards
    towers = vlm.towers.eval()
    device = next(towers.parameters()).device
    dtype = next(towers.parameters()).dtype
    paths, problems = unique_images(data_paths, image_folder, allow_absolute_paths)
    index: dict[str, list] = {}
    shard: dict[str, torch.Tensor] = {}
    n_shards, skipped = 0, []
    for start in range(0, len(paths), batch_size):
        images, names = [], []
        for p in paths[start:start + batch_size]:
            try:
                images.append(load_image(p, max_pixels))
                names.append(p)
            except BadSampleError as e:
                skipped.append(str(e))
        if not images:
            continue
        pixels = vlm.image_processor(images).to(device=device, dtype=dtype)  # [n, 3, H, W]
        feats = towers(pixels).cpu()  # [n, T, C] in the towers' dtype
        for p, f in zip(names, feats, strict=True):
            key = str(len(shard))
            shard[key] = f.contiguous()  # [T, C]
            index[image_key(p)] = [f"features-{n_shards:05d}.safetensors", key]
            if len(shard) >= shard_images:
                _save_shard(out, n_shards, shard)
                n_shards, shard = n_shards + 1, {}
        log.info("cached %d / %d images", min(start + batch_size, len(paths)), len(paths))
    if shard:
        _save_shard(out, n_shards, shard)
        n_shards += 1
    identity = tower_identity(vlm.towers, vlm.config.towers, vlm.config.image_mode)
    meta = {"format": FORMAT, "identity": identity, "num_tokens": identity["num_tokens"],
            "hidden_size": identity["hidden_size"], "dtype": str(dtype).replace("torch.", ""), "images": index}
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(tmp, out / INDEX_FILE)  # the index appears only once every shard is written
    return {"images": len(index), "shards": n_shards, "skipped_images": skipped, "bad_records": problems}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.dataprocess.cache_features", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a VLM directory or a run directory")
    ap.add_argument("--data", required=True, nargs="+", help="JSON/JSONL data file(s)")
    ap.add_argument("--image-folder", default=None, help="folder that relative image paths are under")
    ap.add_argument("--out", required=True, help="cache directory to write")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-images", type=int, default=1024, help="images per safetensors shard")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..model import VLM

    vlm = VLM.from_pretrained(resolve_model_dir(args.model))
    vlm.towers.to(args.device)
    summary = cache_features(vlm, args.data, args.image_folder, args.out, args.batch_size, args.shard_images)
    print(f"cached {summary['images']} image(s) in {summary['shards']} shard(s) under {args.out}; "
          f"skipped {len(summary['skipped_images'])} unreadable image(s), {len(summary['bad_records'])} bad record(s)")
    for reason in (summary["skipped_images"] + summary["bad_records"])[:10]:
        print("  " + reason)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
