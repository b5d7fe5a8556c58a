"""Batched greedy generation: our `VLM.generate` against transformers' `generate`, same weights.

    python benchmarks/generate.py                            # batch 4, 32 new tokens, the issue's shape
    python benchmarks/generate.py --batch-size 8 --new-tokens 64 --device cuda
    python benchmarks/generate.py --quick                    # tiny shapes (tests)

Both sides come from one saved Llava directory (benchmarks/common.py `build_pair`). The prompts are
left-padded one-turn ChatML prompts with images (one per prompt; two in the last of an odd batch). Each
side generates exactly `--new-tokens` tokens per row (no stop token: ours gets no `stop_token_ids`,
transformers gets `eos_token_id=None`), greedy, with its KV cache. After one warm-up call per side,
`--repeats` calls per side run alternately; the figures are
- `tokens_per_s`: new tokens of the whole batch / wall time of the call (prefill included);
- `prefill_s`: wall time of a call with one new token (images through the tower + the prompt);
- `decode_tokens_per_s`: batch * (new_tokens - 1) / (full call - prefill call);
- `cpu_tokens_per_s`, `cpu_decode_tokens_per_s`: the same from process CPU time instead of wall time
  (steadier on a shared machine, with `--threads 1`).
Each figure is the best of the repeats (the least disturbed call).
`--profile N` prints the top-N ops of one prefill call per side. `match` is the fraction of rows whose generated tokens are identical on both sides (a check that the
two compute the same thing; fp32 ties can rarely flip a token).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile
from transformers import GenerationConfig

from benchmarks import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per side")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the top-N ops of one profiled prefill call (1 new token) per side")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.new_tokens, args.repeats = min(args.batch_size, 3), min(args.new_tokens, 6), 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    assert args.new_tokens >= 2, "--new-tokens must be >= 2 (decode speed = full call - prefill call)"
    return args


def ours_generate(model, batch: dict, n: int) -> list[list[int]]:
    return model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], max_new_tokens=n)


def reference_generate(model, batch: dict, n: int, pad_id: int) -> list[list[int]]:
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], generation_config=cfg)  # [B, T + n]
    return out[:, batch["input_ids"].shape[1]:].tolist()


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    common.setup_torch(args.threads)
    spec = common.SPECS["quick" if args.quick else "full"]
    batch = common.to_device(common.left_padded_prompts(spec, args.batch_size, args.seed), device)
    with tempfile.TemporaryDirectory(prefix="bench_gen_") as tmp:
        ours, ref = common.build_pair(spec, Path(tmp), seed=args.seed)
    ours, ref = ours.to(device).eval(), ref.to(device).eval()
    run = {
        "ours": lambda n: ours_generate(ours, batch, n),
        "reference": lambda n: reference_generate(ref, batch, n, spec.eod),
    }
    print(f"generate: device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"new_tokens={args.new_tokens} prompt_len={batch['input_ids'].shape[1]} "
          f"images={batch['pixel_values'].shape[0]} shape={'quick' if args.quick else 'full'}")

    outputs = {}
    with torch.no_grad():
        for name, fn in run.items():  # warm-up, and the outputs compared below
            outputs[name] = fn(args.new_tokens)
        full = {k: [] for k in run}
        prefill = {k: [] for k in run}
        cpu_full = {k: [] for k in run}
        cpu_prefill = {k: [] for k in run}
        for r in range(args.repeats):
            order = list(run) if r % 2 == 0 else list(reversed(list(run)))
            for name in order:
                c0 = time.process_time()
                full[name].append(common.timed(lambda f=run[name]: f(args.new_tokens), device))
                c1 = time.process_time()
                prefill[name].append(common.timed(lambda f=run[name]: f(1), device))
                cpu_full[name].append(c1 - c0)
                cpu_prefill[name].append(time.process_time() - c1)

    lengths = {k: {len(o) for o in v} for k, v in outputs.items()}
    assert lengths == {"ours": {args.new_tokens}, "reference": {args.new_tokens}}, lengths
    match = sum(a == b for a, b in zip(outputs["ours"], outputs["reference"])) / args.batch_size
    new = args.batch_size * args.new_tokens
    results: dict[str, dict[str, float]] = {}
    for name in run:
        t_full, t_pre = min(full[name]), min(prefill[name])  # best of the repeats: least disturbed
        c_full, c_pre = min(cpu_full[name]), min(cpu_prefill[name])
        decoded = args.batch_size * (args.new_tokens - 1)
        results[name] = {
            "tokens_per_s": new / t_full,
            "prefill_s": t_pre,
            "decode_tokens_per_s": decoded / max(t_full - t_pre, 1e-9),
            "cpu_tokens_per_s": new / max(c_full, 1e-9),
            "cpu_decode_tokens_per_s": decoded / max(c_full - c_pre, 1e-9),
        }
    keys = ("tokens_per_s", "prefill_s", "decode_tokens_per_s")
    if device.type == "cpu":  # host CPU time says nothing about GPU work
        keys += ("cpu_tokens_per_s", "cpu_decode_tokens_per_s")
    for key in keys:
        o, r = results["ours"][key], results["reference"][key]
        print(f"{key:<24} ours={o:.3f} reference={r:.3f} ratio={o / r:.2f}")
    print(f"match                    rows with identical tokens: {match:.2f}")
    results["ratio"] = {k: results["ours"][k] / results["reference"][k] for k in results["ours"]}
    results["match"] = match
    if args.profile:
        for name, fn in run.items():
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
                fn(1)
            print(f"\n--- profile of one {name} prefill call (top {args.profile} ops by self CPU time) ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    return results


if __name__ == "__main__":
    main()
