"""Training-step throughput and peak memory: our VLM against transformers' LlavaForConditionalGeneration.

    python benchmarks/train_step.py                          # the issue's shape, 4 timed steps per side
    python benchmarks/train_step.py --steps 8 --batch-size 8 --device cuda
    python benchmarks/train_step.py --quick                  # tiny shapes (tests)

Both sides come from ONE saved Llava directory (benchmarks/common.py `build_pair`): same weights, same
frozen tower, projector + LM trained with the same optimizer (`--optimizer`, default the fused AdamW
kernel, the transformers Trainer's default `adamw_torch_fused`; `adamw` is torch's default for-each /
for-loop AdamW). Each side runs its natural training call (ours:
`VLM(**batch)` with labels; theirs: `LlavaForConditionalGeneration(..., labels=...)`) on the same
collated batches of the synthetic LLaVA-like mix. After `--warmup` steps each, `--steps` steps per
side are timed alternately (the side going first rotates every step) to spread machine noise evenly.
`mfu` = the model FLOPs of the timed batches (trainer/throughput.py, the same for every side) per second
over the measured fp32 matmul peak. `--profile N` adds one profiled step per side: its top-N ops and
its self time by kind of op (matmul, attention, softmax/CE, optimizer, other).
The losses of the first warm-up step (identical weights, identical batch) are printed as a check.
A third side (skipped with `--no-packing`), `packed`, is our model on the same samples packed
padding-free into one row per batch (`dataset.packing.PackingCollator`: `cu_seqlens`, positions restarting
per sample), our natural setup with `packing: true`; printed as `packed_<figure>` lines against the
same reference (which cannot pack). The padded `ours` lines compare the two implementations on the
identical padded batch.

Peak memory: one extra step per side, measured by `common.peak_step_bytes` (CUDA: max_memory_allocated;
CPU: the torch profiler's allocation trace), reported as `peak_mb` = resident parameters + optimizer
state at the step's start + the step's peak allocation (what max_memory_allocated reports on a GPU),
and `step_peak_mb` = the step's own peak (activations, logits, gradients).

Stage 1 with cached features (skipped with `--no-stage1`): our VLM alone with only the projector
training (towers and LM frozen) on a plain-mode mix (one image + a caption per sample), timed alternately
with the tower running on `pixel_values` and with `image_features` = the tower's output computed
beforehand (what a feature cache written by dataprocess gives the dataset; reading it from disk is not
timed). Printed as `stage1_samples_per_s  cached=X pixels=Y ratio=Z`.

Output: one `name  ours=X reference=Y ratio=Z` line per figure (ratio = ours / reference); `main()`
returns the same figures as a dict.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402

from benchmarks import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--optimizer", default="adamw_fused", choices=sorted(OPTIMIZERS))
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps (for tests)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the top-N ops of one profiled step per side")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    ap.add_argument("--no-stage1", action="store_true", help="skip the stage-1 cached-features comparison")
    ap.add_argument("--no-packing", action="store_true", help="skip our packed-batch side")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size = min(args.steps, 2), min(args.warmup, 1), min(args.batch_size, 2)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


OPTIMIZERS = {"adamw_fused": {"fused": True}, "adamw": {}}  # name -> torch.optim.AdamW keywords


class Side:
    """One model with its optimizer and its natural training call."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float, device: torch.device,
                 optimizer: str = "adamw_fused"):
        self.name, self.model, self.device = name, model.to(device).train(), device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, **OPTIMIZERS[optimizer])
        self.times: list[float] = []

    def loss(self, batch: dict) -> torch.Tensor:
        if self.name != "reference":
            return self.model(**batch).loss
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    def step(self, batch: dict) -> float:
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _line(name: str, ours: float, ref: float, fmt: str = "{:.3f}") -> str:
    ratio = ours / ref if ref else float("nan")
    return f"{name:<18} ours={fmt.format(ours)} reference={fmt.format(ref)} ratio={ratio:.2f}"


# Where a step's time goes, by kind of op (self time; the optimizer is everything under its step).
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("softmax/CE", ("log_softmax", "logsumexp", "nll_loss", "cross_entropy", "aten::_softmax")),
)


def _category(e) -> str:
    parent = e
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        parent = parent.cpu_parent
    for cat, keys in CATEGORIES:
        if any(e.name == k or (not k.startswith("aten::") and k in e.name) for k in keys):
            return cat
    return "other (elementwise, copies, norms, rotary, embedding grad)"


def _profile(side: Side, batch: dict, n: int) -> tuple[str, dict[str, float]]:
    """(top-n op table, seconds per category) of one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        side.step(batch)
    key = "self_device_time_total" if side.device.type == "cuda" else "self_cpu_time_total"
    by_cat: dict[str, float] = {}
    for e in prof.events():
        cat = _category(e)
        by_cat[cat] = by_cat.get(cat, 0.0) + getattr(e, key) / 1e6  # GPU: kernel time; CPU: op time
    return prof.key_averages().table(sort_by=key, row_limit=n), by_cat


def _packed_batches(items: list[dict], batch_size: int, device: torch.device) -> list[dict] | None:
    """The same consecutive items as `common.batches`, each batch packed into one row (or None)."""
    try:
        from dataset.packing import PackingCollator
    except ImportError as e:
        print(f"packed side skipped: {e}")
        return None
    collate = PackingCollator()
    return [common.to_device(dict(collate(items[i:i + batch_size])), device)
            for i in range(0, len(items) - batch_size + 1, batch_size)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    common.setup_torch(args.threads)
    spec = common.SPECS["quick" if args.quick else "full"]
    n_batches = max(args.steps, args.warmup, 1)
    items = common.make_mix(spec, n_batches * args.batch_size, seed=args.seed)
    data = [common.to_device(b, device) for b in common.batches(items, args.batch_size, spec.eod)]
    counts = [common.batch_counts(b) for b in data]

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        ours_model, ref_model = common.build_pair(spec, Path(tmp), seed=args.seed)
    sides = {"ours": Side("ours", ours_model, args.lr, device, args.optimizer),
             "reference": Side("reference", ref_model, args.lr, device, args.optimizer)}
    inputs = {"ours": data, "reference": data}
    packed = None if args.no_packing else _packed_batches(items, args.batch_size, device)
    if packed is not None:
        # Our model with the same weights (a copy: its first step sees them unchanged), fed the same
        # samples packed padding-free into one row per batch (dataset/packing.py).
        sides["packed"] = Side("packed", copy.deepcopy(ours_model), args.lr, device, args.optimizer)
        inputs["packed"] = packed

    print(f"train_step: device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"steps={args.steps} warmup={args.warmup} optimizer={args.optimizer} "
          f"shape={'quick' if args.quick else 'full'}")
    per = {k: sum(c[k] for c in counts) / sum(c["samples"] for c in counts) for k in counts[0]}
    print(f"mix per sample: tokens={per['tokens']:.1f} targets={per['targets']:.1f} "
          f"images={per['images']:.2f} (padded length per batch: {[b['input_ids'].shape[1] for b in data]})")

    first = {}
    for w in range(args.warmup):
        for name, side in sides.items():
            loss = side.step(inputs[name][w % len(data)])
            first.setdefault(name, loss)
    if first:
        print(f"first-step loss: ours={first['ours']:.6f} reference={first['reference']:.6f} "
              f"|diff|={abs(first['ours'] - first['reference']):.2e}"
              + (f" packed={first['packed']:.6f}" if "packed" in first else ""))

    from trainer.throughput import ModelDims, batch_stats, peak_matmul_flops, step_flops

    dims = ModelDims.from_model(ours_model)  # the same model on both sides: the same model FLOPs
    flops = [step_flops(dims, batch_stats(b))["total"] for b in data]
    timed_counts = {"samples": 0, "targets": 0, "tokens": 0, "images": 0, "flops": 0}
    names = list(sides)
    for i in range(args.steps):
        order = names[i % len(names):] + names[:i % len(names)]  # who goes first rotates every step
        for name in order:
            side, batch = sides[name], inputs[name][i % len(data)]
            side.times.append(common.timed(lambda s=side, b=batch: s.step(b), device))
        for k in ("samples", "targets", "tokens", "images"):
            timed_counts[k] += counts[i % len(counts)][k]
        timed_counts["flops"] += flops[i % len(flops)]

    peak = peak_matmul_flops(device, torch.float32)
    print(f"model FLOPs per step (trainer/throughput.py): {sum(flops) / len(flops) / 1e9:.1f} G; "
          f"peak matmul {peak / 1e9:.1f} GFLOP/s (fp32)")
    results: dict[str, dict[str, float]] = {}
    for name, side in sides.items():
        total = sum(side.times)
        results[name] = {
            "step_s": total / len(side.times),
            "samples_per_s": timed_counts["samples"] / total,
            "target_tokens_per_s": timed_counts["targets"] / total,
            "tokens_per_s": timed_counts["tokens"] / total,
            "mfu": timed_counts["flops"] / total / peak,
        }
    if not args.no_memory:
        for name, side in sides.items():
            resident = common.resident_bytes(side.model, side.optimizer)
            step_peak = common.peak_step_bytes(lambda s=side, b=inputs[name][0]: s.step(b), device)
            results[name]["step_peak_mb"] = step_peak / 2**20
            results[name]["peak_mb"] = (resident + step_peak) / 2**20

    for key in ("samples_per_s", "target_tokens_per_s", "tokens_per_s", "step_s", "mfu", "peak_mb",
                "step_peak_mb"):
        if key in results["ours"]:
            fmt = "{:.1f}" if key.endswith("mb") or key.startswith(("target", "tokens")) else "{:.3f}"
            print(_line(key, results["ours"][key], results["reference"][key], fmt))
    if "packed" in results:
        for key in ("samples_per_s", "step_s", "mfu", "peak_mb"):
            fmt = "{:.1f}" if key.endswith("mb") else "{:.3f}"
            print(_line(f"packed_{key}", results["packed"][key], results["reference"][key], fmt))
    if args.profile:
        cats = {}
        for name, side in sides.items():
            table, cats[name] = _profile(side, data[0], args.profile)
            print(f"\n--- profile of one {name} step (top {args.profile} ops by self time) ---")
            print(table)
        unit = "GPU" if device.type == "cuda" else "CPU"
        print(f"\nprofiled step, self {unit} seconds by kind of op (batch 0):")
        every = sorted({c for v in cats.values() for c in v}, key=lambda c: -cats["reference"].get(c, 0))
        for cat in every + ["total"]:
            row = {k: (sum(v.values()) if cat == "total" else v.get(cat, 0.0)) for k, v in cats.items()}
            print(f"  {cat:<58} " + " ".join(f"{k}={t:7.2f}" for k, t in row.items()))
        results["profile"] = cats
    results["ratio"] = {k: results["ours"][k] / results["reference"][k] for k in results["ours"]}
    if "packed" in results:
        results["packed_ratio"] = {k: results["packed"][k] / results["reference"][k] for k in results["packed"]}
    results["first_loss"] = first
    if not args.no_stage1:
        sides.clear()  # free the reference and the packed copy before the stage-1 runs
        results["stage1"] = stage1(ours_model, spec, args, device)
    return results


def stage1(vlm: torch.nn.Module, spec, args, device: torch.device) -> dict:
    """Projector-only steps with the tower on pixels vs on cached features (see module docstring)."""
    vlm.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    n_batches = max(args.steps, args.warmup, 1)
    items = common.make_plain_mix(spec, n_batches * args.batch_size, seed=args.seed + 1)
    pixels = [common.to_device(b, device) for b in common.batches(items, args.batch_size, spec.eod)]
    cached = []
    with torch.no_grad():
        for b in pixels:
            b = dict(b)
            b["image_features"] = vlm.towers(b.pop("pixel_values")).float()  # [n_images, T, C], the cache
            cached.append(b)
    sides = {"cached": Side("cached", vlm, args.lr, device, args.optimizer),
             "pixels": Side("pixels", vlm, args.lr, device, args.optimizer)}
    data = {"cached": cached, "pixels": pixels}
    for w in range(args.warmup):
        for name, side in sides.items():
            side.step(data[name][w % n_batches])
    for i in range(args.steps):
        order = ("cached", "pixels") if i % 2 == 0 else ("pixels", "cached")
        for name in order:
            side, batch = sides[name], data[name][i % n_batches]
            side.times.append(common.timed(lambda s=side, b=batch: s.step(b), device))
    out = {name: {"samples_per_s": args.steps * args.batch_size / sum(side.times)} for name, side in sides.items()}
    c, p = out["cached"]["samples_per_s"], out["pixels"]["samples_per_s"]
    print(f"stage1_samples_per_s cached={c:.3f} pixels={p:.3f} ratio={c / p:.2f}")
    # The tower's share of the step's model FLOPs (trainer/throughput.py): the speed-up the cache gives
    # if time followed FLOPs (on a bandwidth-starved CPU the tower's elementwise ops weigh more).
    from trainer.throughput import ModelDims, batch_stats, step_flops

    dims = ModelDims.from_model(vlm)
    parts = [step_flops(dims, batch_stats(b)) for b in pixels]
    share = sum(f["towers"] for f in parts) / sum(f["total"] for f in parts)
    out["tower_flop_share"] = share
    print(f"stage1 tower share of model FLOPs: {share:.2f} (FLOP-proportional speed-up of the cache: "
          f"{1 / max(1 - share, 1e-9):.2f}x)")
    return out


if __name__ == "__main__":
    main()
