"""Data-pipeline throughput (JPEG decode, preprocessing, tokenisation, collation) against training's need.

    python benchmarks/data.py                                # 192 samples, 0/1/2 workers + a training probe
    python benchmarks/data.py --train-samples-per-s 0.8      # skip the training probe, use this figure
    python benchmarks/data.py --quick                        # tiny shapes (tests)
    python benchmarks/data.py --device cuda                  # the training probe's step on a GPU
    python benchmarks/data.py --anyres 2                     # LLaVA-NeXT anyres, pinpoints up to 2x2 tiles

What runs: `--samples` LLaVA-format records (1-3 turns of English-like text, 0-3 images each, as in
benchmarks/common.py's mix) pointing at `--images` distinct JPEGs of `--jpeg-size` (default 640x480,
quality 90, smooth colour fields with shapes and grain, ~50-100 kB) written to a temporary directory.
They go through the real pipeline: `dataset.VLMDataset` (record normalisation, ChatML rendering with
image expansion, `load_image` = JPEG decode + RGB, the tower's `ImageProcessor` = pad to square, resize
to the tower size, normalise) and `dataset.Collator`, read by a `torch.utils.data.DataLoader` with 0, 1
and 2 workers. Tokenisation uses the real Qwen-1 vocabulary when ../shared/data/qwen1 holds it, else a
small BPE vocabulary trained on the generated text (dataprocess/make_vocab.py).

`samples_per_s` is steady state: the clock starts when the first batch arrives (worker start-up and the
first batch excluded) and stops after the last one. The training side is our VLM's training step
(forward + backward + AdamW) on the benchmark model (benchmarks/common.py, the issue's shape) fed with
batches from this pipeline, timed after a warm-up step (or `--train-samples-per-s`). The ratio printed
for each worker count is pipeline samples/s over training samples/s (target: >= 3 with 2 workers). Both
are measured separately, each with the whole machine.

`--anyres K`: the same pipeline and probe with LLaVA-NeXT anyres on (pinpoints: every grid of up to K x K
tiles of the tower size; `multi_image=base`, so a sample with several images gets base views): the dataset
counts each image's tokens from its header size and `visual.pixels.prepare_images` makes the crops; the
line `image tokens per image` gives their min / median / max and crops per image over the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import numpy as np
import torch  # noqa: E402
from PIL import Image, ImageDraw
from qwenvl_lab.dataprocess.make_vocab import train_bpe, write_tiktoken
from qwenvl_lab.dataset import Collator, VLMDataset
from qwenvl_lab.model import VLM
from qwenvl_lab.qwen import load_tokenizer
from qwenvl_lab.visual.pixels import prepare_images
from qwenvl_lab.visual.processor import ImageProcessor
from qwenvl_lab.visual.resolution import Resolution

from benchmarks import common  # noqa: E402

SHARED_QWEN1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen1"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
WORDS = ("the a an of in on with and to is are this that image picture shows left right small large red "
         "blue green yellow white black dog cat person car tree house sky water road table what where how "
         "many color describe detail there near behind front holding standing sitting two three one next "
         "building window street light people background foreground object scene").split()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--images", type=int, default=64, help="distinct JPEG files")
    ap.add_argument("--jpeg-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-samples-per-s", type=float, default=None,
                    help="training consumption; measured here when not given")
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps of the probe")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="where the training probe's step runs (cpu, cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    ap.add_argument("--anyres", type=int, default=0, metavar="K",
                    help="LLaVA-NeXT anyres with pinpoints up to K x K tiles (0 = one fixed square per image)")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.images, args.jpeg_size = min(args.samples, 12), min(args.images, 4), (96, 72)
        args.batch_size, args.train_steps = 2, 1
    return args


# ----- the on-disk data -------------------------------------------------------------------------------
def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[str]:
    """`n` photo-like JPEGs (smooth colour fields, shapes, grain): realistic decode cost and file size."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    names = []
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx / w * rng.uniform(0.3, 1) + yy / h * rng.uniform(0.3, 1))[..., None] / 2  # [h, w, 1]
        arr = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (h, w, 3))  # gradient + sensor-like grain
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.uniform(0, w * 0.8)), int(rng.uniform(0, h * 0.8))
            box = (x0, y0, x0 + int(rng.uniform(20, w / 3)), y0 + int(rng.uniform(20, h / 3)))
            draw.ellipse(box, fill=tuple(int(c) for c in rng.uniform(0, 255, 3)))
        name = f"img_{i:04d}.jpg"
        img.save(folder / name, quality=90)
        names.append(name)
    return names


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def write_records(path: Path, images: list[str], n: int, seed: int, quick: bool) -> list[dict]:
    """LLaVA-format records: 1-3 turns, 0-3 images (the mix's weights), `<image>` markers in place."""
    rng = random.Random(seed)
    weights = common.SPECS["full"].image_weights
    q_len, a_len = ((2, 6), (2, 8)) if quick else ((6, 30), (6, 60))
    records = []
    for i in range(n):
        n_img = rng.choices(range(len(weights)), weights=weights)[0]
        n_turns = rng.randint(1, 2 if quick else 3)
        conv = []
        for turn in range(n_turns):
            markers = "<image>\n" * (n_img if turn == 0 else 0)
            conv.append({"from": "human", "value": markers + _sentence(rng, *q_len)})
            conv.append({"from": "gpt", "value": _sentence(rng, *a_len)})
        rec = {"id": f"s{i}", "conversations": conv}
        if n_img:
            rec["image"] = [rng.choice(images) for _ in range(n_img)]
        records.append(rec)
    path.write_text(json.dumps(records))
    return records


def load_vocab(folder: Path, records: list[dict], quick: bool):
    """(tokenizer, where it came from): the real Qwen-1 vocabulary when present, else a trained one."""
    if (SHARED_QWEN1 / "qwen.tiktoken").is_file() and not quick:
        return load_tokenizer(SHARED_QWEN1), f"Qwen-1 ({SHARED_QWEN1})"

    texts = [t["value"].replace("<image>", " ") for r in records for t in r["conversations"]]
    merges = 20 if quick else 1000
    write_tiktoken(train_bpe(texts, merges), folder / "vocab")
    return load_tokenizer(folder / "vocab"), f"generated BPE ({merges} merges)"


# ----- measurements -----------------------------------------------------------------------------------
def pinpoints(size: int, k: int) -> list[list[int]]:
    """Every (rows x cols) tile grid with rows, cols <= k, in pixels of the tower size: LLaVA-NeXT's kind of list."""
    return [[r * size, c * size] for r in range(1, k + 1) for c in range(1, k + 1)]


def pipeline_rate(dataset, batch_size: int, workers: int, pad_id: int) -> tuple[float, int]:
    """(steady-state samples/s, batches) of one pass of a DataLoader over `dataset`."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=Collator(pad_id=pad_id), shuffle=False)
    n_samples, n_batches, t0 = 0, 0, None
    for batch in loader:
        if t0 is None:
            t0 = time.perf_counter()  # first batch in hand: start-up is not steady state
            continue
        n_samples += int(batch["input_ids"].shape[0])
        n_batches += 1
    assert n_batches, "need at least 2 batches: raise --samples"
    return n_samples / (time.perf_counter() - t0), n_batches + 1


def train_rate(tok, dataset, args, tmp: Path) -> float:
    """Our VLM's training samples/s on the benchmark model, fed by this pipeline."""
    base = common.SPECS["quick" if args.quick else "full"]
    # The model's placeholder and ChatML ids must be the tokenizer's (a real or a generated vocabulary).
    spec = dataclasses.replace(base, image_token=tok.image_token_id, im_start=tok.im_start_id,
                               im_end=tok.im_end_id, eod=tok.eod_id, vocab_size=max(base.vocab_size, len(tok)))
    device = torch.device(args.device)
    over = {"image_grid_pinpoints": pinpoints(spec.image_size, args.anyres)} if args.anyres else {}
    vlm = VLM.from_pretrained(common.save_llava(spec, tmp / "llava", args.seed), **over).to(device).train()
    assert vlm.tokens_per_image == dataset.tokens_per_image
    assert (vlm.resolution.mode == "anyres") == bool(args.anyres)
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-5)
    collate = Collator(pad_id=tok.eod_id)
    n = args.batch_size
    data = [common.to_device(dict(collate([dataset[j] for j in range(i * n, (i + 1) * n)])), device)
            for i in range(args.train_steps + 1)]

    def step(batch):
        vlm(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(data[0])  # warm-up
    t = sum(common.timed(lambda b=b: step(b), device) for b in data[1:])
    return args.train_steps * n / t


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.setup_torch(args.threads)

    spec = common.SPECS["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        names = write_jpegs(tmp / "images", args.images, tuple(args.jpeg_size), args.seed)
        records = write_records(tmp / "data.json", names, args.samples, args.seed, args.quick)
        tok, vocab = load_vocab(tmp, records, args.quick)
        processor = ImageProcessor(size=spec.image_size, mean=CLIP_MEAN, std=CLIP_STD, mode="pad")
        res = None
        if args.anyres:
            res = Resolution(mode="anyres", image_size=spec.image_size, grid=(spec.image_size // spec.patch_size,) * 2,
                             tokens_per_crop=spec.tokens_per_image, pinpoints=pinpoints(spec.image_size, args.anyres))
        ds = VLMDataset(tmp / "data.json", tok, processor, spec.tokens_per_image, image_folder=str(tmp / "images"),
                        strict=True, resolution=res, prepare_images=prepare_images)
        if res is not None:
            ds.validate()
            per_image = sorted(res.layout(*img.size, 1).tokens for img in
                               (Image.open(tmp / "images" / f) for f in names))
            crops = res.layout(*args.jpeg_size, 1).crops
            print(f"image tokens per image (anyres, one image per sample): min {per_image[0]} median "
                  f"{per_image[len(per_image) // 2]} max {per_image[-1]}; crops for {args.jpeg_size[0]}x"
                  f"{args.jpeg_size[1]}: {crops}; base view only in multi-image samples")
        n_img = sum(len(r.get("image", [])) for r in records)
        jpeg_kb = sum((tmp / "images" / f).stat().st_size for f in names) / len(names) / 1024
        print(f"data: samples={len(ds)} images={n_img} jpeg={args.jpeg_size[0]}x{args.jpeg_size[1]} "
              f"({jpeg_kb:.0f} kB avg) tower={spec.image_size}px batch={args.batch_size} vocab={vocab} "
              f"threads={torch.get_num_threads()}")

        results: dict = {"pipeline": {}}
        for w in args.workers:
            rate, nb = pipeline_rate(ds, args.batch_size, w, tok.eod_id)
            results["pipeline"][w] = rate
        if args.train_samples_per_s is not None:
            train, how = float(args.train_samples_per_s), "given by --train-samples-per-s"
        else:
            train, how = train_rate(tok, ds, args, tmp), f"our training step on the benchmark model, {args.device}"
    results["train_samples_per_s"] = train
    print(f"train_samples_per_s  {train:.3f} ({how})")
    for w, rate in results["pipeline"].items():
        print(f"workers={w:<2} samples_per_s={rate:.2f} ratio_to_train={rate / train:.1f}")
    results["ratio"] = {w: r / train for w, r in results["pipeline"].items()}
    return results


if __name__ == "__main__":
    main()
