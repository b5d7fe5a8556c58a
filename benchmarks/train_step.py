"""Training-step throughput and peak memory: our VLM against transformers' LlavaForConditionalGeneration.

    python benchmarks/train_step.py                          # the benchmark shape, all default lines
    python benchmarks/train_step.py --threads 1 --levers compile,fused_compile,copies,malloc
    python benchmarks/train_step.py --steps 8 --batch-size 8 --device cuda
    python benchmarks/train_step.py --quick                  # tiny shapes (tests)

Sides (all from ONE saved Llava directory, benchmarks/common.py `build_pair`: same weights, same frozen
tower, projector + LM trained with the same optimizer, `--optimizer`, default the fused AdamW kernel that
transformers' Trainer uses, `adamw_torch_fused`):
- `ours`: `VLM(**batch)` with labels (the loss at supervised positions only, chunked fused linear +
  cross-entropy, `core/loss.py`), padded batches exactly as training collates them;
- `reference_sup`: the strongest peer configuration: transformers' LLaVA computes the hidden states
  (`model.model(...)`), then the head and the cross-entropy run at the supervised positions only with
  the same chunked fused linear + cross-entropy (what LLaMA-Factory users get from Liger's fused linear
  cross-entropy, which is a Triton kernel and does not run on a CPU; the algorithm is the same);
  every `ratio=` compares against this side;
- `reference`: transformers' LLaVA with `labels=` (full `[B, T, V]` logits), shown as `ratio_ref=`;
- `packed` (skipped by `--no-packing`): ours on the same samples packed padding-free into one row per
  batch (`dataset.packing.PackingCollator`);
- lever sides (`--levers a,b`): ours with one change each, `ratio_ours=` = lever / ours:
  `compile` (the LM's decoder blocks through torch.compile, `QWenLMHeadModel.compile_blocks`),
  `fused_compile` / `fused_triton` (RMSNorm, rotary and SwiGLU through `kernels.fused` with
  impl=compile / triton), `copies` (ours WITHOUT the copy savings, i.e. with the padding mask and the dense
  embedding gradient: shows what they give), `malloc` (ours with glibc's default allocator instead of
  the retained heap: shows what `trainer/cpu_malloc.py` gives; switched before each of its steps),
  `baseline` (both of the last two: the training step as it was before them).
- bf16 (skipped by `--no-bf16`, and on a CPU without native bf16, saying why): ours and reference_sup
  again, each step under `torch.autocast(bfloat16)`, with their own profile unless `--no-profile`.

Method: after `--warmup` untimed steps per side, `--steps` rounds; in each round every side runs one step
and the side going first rotates. Wall time and process CPU time are both recorded per step (on a
loaded machine, `cpu_s` with `--threads 1` is the steadier figure). MFU = model FLOPs
(model/flops.py) / time / the best square-matmul FLOP/s measured between the rounds (so that it
sees the same load), by wall time (`mfu`) and by CPU time (`mfu_cpu`). On a CPU the process uses glibc's
allocator in `retain` mode (as `train.py` does; `--malloc default` for glibc's defaults), for every side.

Peak memory (skipped by `--no-memory`): one extra step per side, `common.peak_step_bytes` (CUDA:
max_memory_allocated; CPU: the profiler's allocation trace): `peak_mb` = parameters + optimizer state
resident at the step's start + the step's peak allocation, `step_peak_mb` = the step's own peak.

Profile (skipped by `--no-profile`): one profiled step per side (batch 0), self time by kind of op
(matmul, attention, softmax/CE, loss head, optimizer, other) and the "other" (elementwise) time split
into its parts (pointwise math, copies/casts, fills, reductions, embedding, tower norms/conv), forward and
backward; `--profile N` also prints the top-N ops of each side, by op and input shapes.

Stage 1 (skipped by `--no-stage1`): the `stage1` spec (LLaVA-1.5 pretraining scaled down), our VLM with
only the projector training (tower and LM frozen), timed alternately with the tower running on
`pixel_values` and with `image_features` = the tower's output computed beforehand (what a feature cache
gives; reading it is not timed), beside the FLOP-proportional bound 1 / (1 - tower's FLOP share).

Output: `name  ours=X reference_sup=Y ratio=X/Y reference=Z ratio_ref=X/Z` lines (lower is better for
`*_s` and `*_mb`), `<side>_<name> ... ratio=` lines for the other sides, and `main()` returns the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402
from qwenvl_lab.core.loss import supervised_loss  # noqa: E402
from qwenvl_lab.dataset.packing import PackingCollator
from qwenvl_lab.model import dtypes  # noqa: E402
from qwenvl_lab.model.flops import ModelDims, batch_stats, measure_matmul_peak, step_flops
from torch.profiler import ProfilerActivity, profile

from benchmarks import common  # noqa: E402

OPTIMIZERS = {"adamw_fused": {"fused": True}, "adamw": {}}  # name -> torch.optim.AdamW keywords
LEVERS = ("compile", "fused_compile", "fused_triton", "copies", "malloc", "baseline")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed rounds (one step per side each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--optimizer", default="adamw_fused", choices=sorted(OPTIMIZERS))
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps (for tests)")
    ap.add_argument("--levers", default="", help=f"comma-separated lever sides: {', '.join(LEVERS)}")
    ap.add_argument("--malloc", default="retain", choices=("retain", "default"),
                    help="glibc allocator mode for the process (CPU)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also print the top-N ops (by op and input shapes) per side")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled step and its breakdown")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    ap.add_argument("--no-stage1", action="store_true", help="skip the stage-1 cached-features comparison")
    ap.add_argument("--no-packing", action="store_true", help="skip our packed-batch side")
    ap.add_argument("--no-reference", action="store_true", help="skip the full-logits reference side")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast lines")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size = min(args.steps, 2), min(args.warmup, 1), min(args.batch_size, 2)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.levers = [x for x in args.levers.split(",") if x]
    bad = [x for x in args.levers if x not in LEVERS]
    if bad:
        ap.error(f"--levers: unknown {bad}; choose from {', '.join(LEVERS)}")
    return args


class Side:
    """One model with its optimizer and its natural training call."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float, device: torch.device,
                 optimizer: str = "adamw_fused", kind: str = "ours", autocast: torch.dtype | None = None,
                 malloc: str | None = None):
        self.name, self.model, self.device, self.kind = name, model.to(device).train(), device, kind
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, **OPTIMIZERS[optimizer])
        self.autocast, self.malloc = autocast, malloc
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def loss(self, batch: dict) -> torch.Tensor:
        m = self.model
        if self.kind == "ours":
            return m(**batch).loss
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"])
        if self.kind == "reference":
            return m(**inputs, labels=batch["labels"]).loss
        hidden = m.model(**inputs, use_cache=False)[0]  # [B, T, H] transformers' LLaVA, final norm applied
        return supervised_loss(hidden, m.lm_head, batch["labels"])  # head + CE at supervised positions only

    def step(self, batch: dict) -> float:
        ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed_step(self, batch: dict, default_malloc: str) -> None:
        if self.device.type == "cpu":
            common.set_malloc(self.malloc or default_malloc)
        c0 = time.process_time()
        self.times.append(common.timed(lambda: self.step(batch), self.device))
        self.cpu_times.append(time.process_time() - c0)


# ----- profile: where a step's time goes ---------------------------------------------------------------
# (kind, op names); "other" is split further by OTHER_PARTS.
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("softmax/CE", ("log_softmax", "logsumexp", "nll_loss", "cross_entropy", "aten::_softmax")),
)
OTHER_PARTS = (
    ("copies/casts", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::stack",
                      "aten::repeat_interleave", "aten::index", "aten::index_put_", "aten::_index_put_impl_",
                      "aten::masked_fill", "aten::masked_fill_", "aten::where", "aten::contiguous",
                      "aten::gather", "aten::scatter", "aten::masked_scatter")),
    ("fills/allocs", ("aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like", "aten::ones",
                      "aten::empty", "aten::empty_like", "aten::new_zeros", "aten::full", "aten::resize_")),
    ("reductions", ("aten::sum", "aten::mean", "aten::amax", "aten::max", "aten::any", "aten::argmax")),
    ("embedding", ("aten::embedding_dense_backward", "aten::embedding_backward", "aten::index_add_",
                   "aten::embedding_sparse_backward", "aten::_sparse*", "aten::_coalesce", "aten::index_select",
                   "aten::embedding")),
    ("tower norms/conv", ("aten::native_layer_norm", "aten::native_layer_norm_backward", "convolution")),
    ("compiled kernels", ("Torch-Compiled Region", "CompiledFunction", "inductor", "triton")),
)
OTHER = "other"


def _ancestors(e):
    parent = e.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _category(e) -> tuple[str, str, bool]:
    """(kind, part of "other" or "", in backward) of one profiler event."""
    names = [p.name for p in _ancestors(e)]
    backward = any(n.startswith("autograd::engine::evaluate_function") for n in names)
    if any(n.startswith("Optimizer.") for n in names):
        return "optimizer", "", backward
    for cat, keys in CATEGORIES:
        if any(e.name == k or (not k.startswith("aten::") and k in e.name) for k in keys):
            return cat, "", backward
    if any("_FusedLinearCE" in n for n in names + [e.name]):
        return "loss head (fused CE, non-matmul)", "", backward
    for part, keys in OTHER_PARTS:
        if any(e.name == k or (k.endswith("*") and e.name.startswith(k[:-1]))
               or (not k.startswith("aten::") and k in e.name) for k in keys):
            return OTHER, part, backward
    return OTHER, "pointwise math", backward


def _profile(side: Side, batch: dict, n: int) -> tuple[str, dict[str, float]]:
    """(top-n op table, seconds per kind and per "other" part) of one profiled step."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=bool(n)) as prof:  # shapes only for the top-n table
        side.step(batch)
    gpu = side.device.type == "cuda"
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    out: dict[str, float] = {}
    for e in prof.events():
        if gpu and str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue  # a kernel's own event: its time is already its launching op's self device time
        t = getattr(e, key) / 1e6  # GPU: kernel time of the op; CPU: op time
        if not t:
            continue
        cat, part, backward = _category(e)
        out[cat] = out.get(cat, 0.0) + t
        if cat == OTHER:
            k = f"{part} ({'bwd' if backward else 'fwd'})"
            out["other: " + k] = out.get("other: " + k, 0.0) + t
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=n) if n else ""
    return table, out


def _print_profile(cats: dict[str, dict[str, float]], device: torch.device) -> None:
    unit = "GPU" if device.type == "cuda" else "CPU"
    print(f"profile of one step (batch 0), self {unit} seconds by kind of op:")
    sides = list(cats)
    kinds = sorted({c for v in cats.values() for c in v if not c.startswith("other: ")},
                   key=lambda c: -max(v.get(c, 0.0) for v in cats.values()))
    total = {k: sum(t for c, t in v.items() if not c.startswith("other: ")) for k, v in cats.items()}
    print(f"  {'kind':<44} " + " ".join(f"{s:>14}" for s in sides))
    for c in kinds:
        print(f"  {c:<44} " + " ".join(f"{cats[s].get(c, 0.0):14.2f}" for s in sides))
    print(f"  {'total':<44} " + " ".join(f"{total[s]:14.2f}" for s in sides))
    parts = sorted({c for v in cats.values() for c in v if c.startswith("other: ")},
                   key=lambda c: -max(v.get(c, 0.0) for v in cats.values()))
    print("  the \"other\" (elementwise) time by part:")
    for c in parts:
        print(f"    {c[7:]:<42} " + " ".join(f"{cats[s].get(c, 0.0):14.2f}" for s in sides))


# ----- the run -----------------------------------------------------------------------------------------
def _packed_batches(items: list[dict], batch_size: int, device: torch.device) -> list[dict] | None:
    """The same consecutive items as `common.batches`, each batch packed into one row (or None)."""
    collate = PackingCollator()
    return [common.to_device(dict(collate(items[i:i + batch_size])), device)
            for i in range(0, len(items) - batch_size + 1, batch_size)]


def _lever_model(lever: str, ours: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
    """A copy of our model with one lever applied, or None (with a message) where it cannot run."""
    m = copy.deepcopy(ours)
    lm = m.lm
    if lever == "compile":
        t0 = time.perf_counter()
        ok = lm.to(device).compile_blocks()
        print(f"lever compile: compile_blocks {'compiled' if ok else 'FAILED (stays eager)'} in "
              f"{time.perf_counter() - t0:.1f} s (the first real shapes may add a recompile)")
        return m if ok else None
    if lever in ("fused_compile", "fused_triton"):
        impl = lever.split("_")[1]
        if impl == "triton" and device.type != "cuda":
            print("lever fused_triton: skipped, the Triton kernels need a CUDA GPU")
            return None
        lm.set_fused_impl(impl)
        return m
    if lever in ("copies", "baseline"):
        lm.transformer.mask_free_right_padding = False
        return m
    if lever == "malloc":
        if device.type != "cpu":
            print("lever malloc: skipped, the allocator setting is for CPU runs")
            return None
        return m
    raise ValueError(lever)


def _line(name: str, vals: dict[str, float], base: str, extra: tuple[str, ...] = (), fmt: str = "{:.3f}") -> str:
    """`name  side=value base=value ratio=side/base [extra=value ratio_extra=side/extra]`."""
    first = next(k for k in vals if k != base and k not in extra)
    v, b = vals[first], vals[base]
    out = f"{name:<24} {first}={fmt.format(v)} {base}={fmt.format(b)} ratio={v / b if b else float('nan'):.2f}"
    for e in extra:
        if e in vals:
            tag = "ratio_ref" if e == "reference" else f"ratio_{e}"
            out += f" {e}={fmt.format(vals[e])} {tag}={v / vals[e] if vals[e] else float('nan'):.2f}"
    return out


def _fmt(key: str) -> str:
    return "{:.1f}" if key.endswith("mb") or key.startswith(("target", "tokens")) else "{:.3f}"


def _build_sides(args, spec, items: list[dict], data: list[dict], device: torch.device
                 ) -> tuple[dict[str, Side], dict[str, list[dict]], torch.nn.Module]:
    """Every side of the comparison, the batches each one steps on, and our model (the FLOPs' source)."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        ours_model, ref_sup_model = common.build_pair(spec, Path(tmp), seed=args.seed)
        ref_full = None if args.no_reference else common.load_reference(Path(tmp) / "llava")
    mk = dict(lr=args.lr, device=device, optimizer=args.optimizer)
    sides = {"ours": Side("ours", ours_model, kind="ours", **mk),
             "reference_sup": Side("reference_sup", ref_sup_model, kind="reference_sup", **mk)}
    if ref_full is not None:
        sides["reference"] = Side("reference", ref_full, kind="reference", **mk)
    inputs = {name: data for name in sides}
    packed = None if args.no_packing else _packed_batches(items, args.batch_size, device)
    if packed is not None:
        sides["packed"] = Side("packed", copy.deepcopy(ours_model), kind="ours", **mk)
        inputs["packed"] = packed
    for lever in args.levers:
        m = _lever_model(lever, ours_model, device)
        if m is not None:
            malloc = "default" if lever in ("malloc", "baseline") and device.type == "cpu" else None
            sides[lever] = Side(lever, m, kind="ours", malloc=malloc, **mk)
            inputs[lever] = data
    return sides, inputs, ours_model


def _warmup(sides: dict[str, Side], inputs: dict[str, list[dict]], n_data: int, args, device: torch.device
            ) -> dict[str, float]:
    """The untimed steps of every side; prints and returns each side's first-step loss."""
    first = {}
    for w in range(args.warmup):
        for name, side in sides.items():
            if device.type == "cpu":
                common.set_malloc(side.malloc or args.malloc)
            loss = side.step(inputs[name][w % n_data])
            first.setdefault(name, loss)
    if first:
        ref_loss = first["reference_sup"]
        print("first-step loss: " + " ".join(f"{k}={v:.6f}" for k, v in first.items())
              + f" max|diff|={max(abs(v - ref_loss) for v in first.values()):.2e}")
    return first


def _timed_rounds(sides: dict[str, Side], inputs: dict[str, list[dict]], data: list[dict], counts: list[dict],
                  ours_model: torch.nn.Module, args, device: torch.device
                  ) -> tuple[dict[str, float], float, float]:
    """`--steps` rounds, one step per side each, the first side rotating; returns the timed samples /
    targets / tokens / model FLOPs and the best matmul FLOP/s measured between the rounds (wall, CPU)."""
    dims = ModelDims.from_model(ours_model)  # the same model on every side: the same model FLOPs
    flops = [step_flops(dims, batch_stats(b))["total"] for b in data]
    timed_counts = {"samples": 0, "targets": 0, "tokens": 0, "flops": 0}
    names = list(sides)
    peaks = []
    for i in range(args.steps):
        if device.type == "cpu":
            common.set_malloc(args.malloc)
        # Measured again every round, so that the peak sees the same machine load as the steps.
        peaks.append(measure_matmul_peak(device, repeats=3))
        order = names[i % len(names):] + names[:i % len(names)]  # who goes first rotates every round
        for name in order:
            sides[name].timed_step(inputs[name][i % len(data)], args.malloc)
        for k in ("samples", "targets", "tokens"):
            timed_counts[k] += counts[i % len(counts)][k]
        timed_counts["flops"] += flops[i % len(flops)]
    if device.type == "cpu":
        common.set_malloc(args.malloc)
    peak_wall, peak_cpu = max(p[0] for p in peaks), max(p[1] for p in peaks)
    print(f"model FLOPs per step (model/flops.py): {sum(flops) / len(flops) / 1e9:.1f} G; "
          f"peak matmul (best between rounds) {peak_wall / 1e9:.1f} GFLOP/s wall, "
          f"{peak_cpu / 1e9:.1f} GFLOP/s per CPU-second (fp32)")
    return timed_counts, peak_wall, peak_cpu


def _side_figures(sides: dict[str, Side], timed_counts: dict[str, float], peak_wall: float, peak_cpu: float
                  ) -> dict[str, dict[str, float]]:
    """Each side's throughput, step time and MFU over its timed steps."""
    results: dict[str, dict[str, float]] = {}
    for name, side in sides.items():
        total, cpu = sum(side.times), sum(side.cpu_times)
        results[name] = {
            "samples_per_s": timed_counts["samples"] / total,
            "target_tokens_per_s": timed_counts["targets"] / total,
            "tokens_per_s": timed_counts["tokens"] / total,
            "step_s": total / len(side.times),
            "cpu_s": cpu / len(side.cpu_times),
            "mfu": timed_counts["flops"] / total / peak_wall,
            "mfu_cpu": timed_counts["flops"] / max(cpu, 1e-9) / peak_cpu,
        }
    return results


def _add_peak_memory(results: dict[str, dict[str, float]], sides: dict[str, Side],
                     inputs: dict[str, list[dict]], device: torch.device) -> None:
    """One extra step per side: `step_peak_mb` and `peak_mb` (with the resident parameters and optimizer)."""
    for name, side in sides.items():
        resident = common.resident_bytes(side.model, side.optimizer)
        step_peak = common.peak_step_bytes(lambda s=side, b=inputs[name][0]: s.step(b), device)
        results[name]["step_peak_mb"] = step_peak / 2**20
        results[name]["peak_mb"] = (resident + step_peak) / 2**20


def _print_figures(results: dict[str, dict[str, float]], sides: dict[str, Side], device: torch.device
                   ) -> None:
    """The `name ours=... reference_sup=... ratio=...` lines, then one line per figure of every other side."""
    keys = ("samples_per_s", "target_tokens_per_s", "tokens_per_s", "step_s", "cpu_s", "mfu", "mfu_cpu",
            "peak_mb", "step_peak_mb")
    if device.type != "cpu":  # host CPU time says nothing about a GPU step
        keys = tuple(k for k in keys if k not in ("cpu_s", "mfu_cpu"))
    for key in keys:
        if key in results["ours"]:
            vals = {k: results[k][key] for k in ("ours", "reference_sup", "reference") if k in results}
            print(_line(key, vals, "reference_sup", ("reference",), _fmt(key)))
    for name in sides:
        if name in ("ours", "reference_sup", "reference"):
            continue
        for key in ("samples_per_s", "step_s", "cpu_s", "mfu", "peak_mb"):
            if key in results[name] and key in keys:
                vals = {name: results[name][key], "reference_sup": results["reference_sup"][key],
                        "ours": results["ours"][key]}
                print(_line(f"{name}_{key}", vals, "reference_sup", ("ours",), _fmt(key)))


def _profile_sides(sides: dict[str, Side], inputs: dict[str, list[dict]], args, device: torch.device
                   ) -> dict[str, dict[str, float]]:
    """One profiled step per side; prints the breakdown and returns each side's time by kind of op."""
    cats = {}
    for name, side in sides.items():
        if device.type == "cpu":
            common.set_malloc(side.malloc or args.malloc)
        table, cats[name] = _profile(side, inputs[name][0], args.profile)
        if table:
            print(f"\n--- profile of one {name} step (top {args.profile} ops by self time) ---\n{table}")
    if device.type == "cpu":
        common.set_malloc(args.malloc)
    _print_profile(cats, device)
    o, s = cats["ours"].get(OTHER, 0.0), cats["reference_sup"].get(OTHER, 0.0)
    print(f"other_s (elementwise) ours={o:.3f} reference_sup={s:.3f} ratio={o / s if s else float('nan'):.2f}")
    return cats


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    common.setup_torch(args.threads)
    if device.type == "cpu":
        common.set_malloc(args.malloc)
    spec = common.SPECS["quick" if args.quick else "full"]
    n_batches = max(args.steps, args.warmup, 1)
    items = common.make_mix(spec, n_batches * args.batch_size, seed=args.seed)
    data = [common.to_device(b, device) for b in common.batches(items, args.batch_size, spec.eod)]
    counts = [common.batch_counts(b) for b in data]
    sides, inputs, ours_model = _build_sides(args, spec, items, data, device)

    print(f"train_step: device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"steps={args.steps} warmup={args.warmup} optimizer={args.optimizer} malloc={args.malloc} "
          f"shape={'quick' if args.quick else 'full'} sides={','.join(sides)}")
    per = {k: sum(c[k] for c in counts) / sum(c["samples"] for c in counts) for k in counts[0]}
    print(f"mix per sample: tokens={per['tokens']:.1f} targets={per['targets']:.1f} "
          f"images={per['images']:.2f} (padded length per batch: {[b['input_ids'].shape[1] for b in data]})")

    first = _warmup(sides, inputs, len(data), args, device)
    timed_counts, peak_wall, peak_cpu = _timed_rounds(sides, inputs, data, counts, ours_model, args, device)
    results = _side_figures(sides, timed_counts, peak_wall, peak_cpu)
    if not args.no_memory:
        _add_peak_memory(results, sides, inputs, device)
    _print_figures(results, sides, device)
    if not args.no_profile or args.profile:
        results["profile"] = _profile_sides(sides, inputs, args, device)

    results["ratio"] = {k: results["ours"][k] / results["reference_sup"][k] for k in results["ours"]}
    results["first_loss"] = first
    bf16_ok, why = dtypes.cuda_native_bf16(device.index) if device.type == "cuda" else dtypes.cpu_native_bf16()
    if args.no_bf16:
        pass
    elif not bf16_ok:
        print(f"bf16: skipped: no native bf16 matmul on this {'GPU' if device.type == 'cuda' else 'CPU'}: {why}")
    else:
        results["bf16"] = bf16_lines(sides, data, args, device)
    for name in list(sides):
        if name != "ours":
            del sides[name]  # free the other models before the stage-1 runs
    if not args.no_stage1:
        results["stage1"] = stage1(args, device)
    return results


def bf16_lines(sides: dict, data: list[dict], args, device: torch.device) -> dict:
    """ours and reference_sup again, each step under autocast(bfloat16), rounds alternated."""
    pair = {}
    for name in ("ours", "reference_sup"):
        s = sides[name]
        pair[name] = Side(name, s.model, args.lr, device, args.optimizer, kind=s.kind, autocast=torch.bfloat16)
    for w in range(args.warmup):
        for side in pair.values():
            side.step(data[w % len(data)])
    for i in range(args.steps):
        order = list(pair) if i % 2 == 0 else list(reversed(list(pair)))
        for name in order:
            pair[name].timed_step(data[i % len(data)], args.malloc)
    n = args.steps * args.batch_size
    out = {k: {"samples_per_s": n / sum(s.times), "step_s": sum(s.times) / len(s.times),
               "cpu_s": sum(s.cpu_times) / len(s.cpu_times)} for k, s in pair.items()}
    for key in ("samples_per_s", "step_s") + (("cpu_s",) if device.type == "cpu" else ()):
        print(_line(f"bf16_{key}", {k: out[k][key] for k in out}, "reference_sup"))
    if not args.no_profile or args.profile:
        print("bf16 autocast:")
        out["profile"] = _profile_sides(pair, {k: data for k in pair}, args, device)
    return out


def stage1(args, device: torch.device) -> dict:
    """Projector-only steps on the stage-1 shape: tower on pixels vs cached features (module docstring)."""
    spec = common.SPECS["stage1_quick" if args.quick else "stage1"]
    with tempfile.TemporaryDirectory(prefix="bench_stage1_") as tmp:
        vlm = common.load_ours(common.save_llava(spec, Path(tmp) / "llava", seed=args.seed))
    vlm = vlm.to(device)
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
            sides[name].timed_step(data[name][i % n_batches], args.malloc)
    out = {name: {"samples_per_s": args.steps * args.batch_size / sum(s.times),
                  "cpu_s": sum(s.cpu_times) / len(s.cpu_times)} for name, s in sides.items()}
    c, p = out["cached"]["samples_per_s"], out["pixels"]["samples_per_s"]
    cpu_ratio = out["pixels"]["cpu_s"] / out["cached"]["cpu_s"]
    dims = ModelDims.from_model(vlm)
    parts = [step_flops(dims, batch_stats(b)) for b in pixels]
    share = sum(f["towers"] for f in parts) / sum(f["total"] for f in parts)
    bound = 1 / max(1 - share, 1e-9)
    print(f"stage1 shape: {spec.image_size} px / patch {spec.patch_size} -> {spec.tokens_per_image} tokens, "
          f"tower {spec.vision_layers} x {spec.vision_hidden} (frozen), LM {spec.lm_layers} x {spec.lm_hidden} "
          f"(frozen), projector trains; tower share of model FLOPs {share:.2f}")
    cpu_note = f" (cpu-time ratio {cpu_ratio:.2f})" if device.type == "cpu" else ""
    print(f"stage1_samples_per_s     cached={c:.3f} pixels={p:.3f} ratio={c / p:.2f}{cpu_note} "
          f"flop_bound={bound:.2f} of_bound={c / p / bound:.2f}")
    out.update(tower_flop_share=share, bound=bound, ratio=c / p, cpu_ratio=cpu_ratio)
    return out


if __name__ == "__main__":
    main()
