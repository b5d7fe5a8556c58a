"""Serving throughput: the batching engine at concurrency 1, 8 and 32 against one-at-a-time generation.

    python benchmarks/serve.py                       # the benchmark model (benchmarks/common.py "full")
    python benchmarks/serve.py --requests 64 --new-tokens 64 --device cuda
    python benchmarks/serve.py --quick               # tiny shapes (tests)

The model is the benchmark model of benchmarks/common.py (ours, read from the saved Llava directory).
`--requests` one-turn prompts with one image each (random text lengths, so prompts differ) each generate
exactly `--new-tokens` tokens, greedy (`ignore_eos`, so every mode does the same work):
- `one_at_a_time`: `vlm.generate` per request, one after another in one worker thread (what a server
  without batching does);
- `concurrency=C`: C client threads each submit their next request to `serve.engine.Engine`
  (`--max-batch-size`, default 32) as soon as their previous one is answered; requests join and leave
  the running batch between decoding steps.
Figures per mode: `requests_per_s` and `tokens_per_s` (generated tokens / wall time of the whole run),
`mean_latency_s` (submit to last token), `ratio` (tokens/s over one-at-a-time's) and `match` (the fraction
of requests whose tokens equal one-at-a-time's: batching must not change greedy answers; fp32 rounding can
rarely flip a near-tie). Every mode runs once per round (`--rounds`, default 2), in the opposite order
each round, and the figures add up the rounds: slow drifts of a shared machine's load fall on every mode.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402
from qwenvl_lab.serve.decode import SamplingParams  # noqa: E402
from qwenvl_lab.serve.engine import Engine, Job  # noqa: E402

from benchmarks import common  # noqa: E402


class _BenchModel:
    """The benchmark VLM plus what a tokenizer would give (its Llava directory has none): the ChatML stop
    ids, the padding id and a decode to id strings. Everything else goes to the VLM."""

    def __init__(self, vlm, spec: common.BenchSpec):
        self._vlm, self.stop_token_ids, self.pad_token_id = vlm, [spec.im_end, spec.im_start], spec.eod

    def __call__(self, *args, **kw):
        return self._vlm(*args, **kw)

    def parameters(self):
        return self._vlm.parameters()

    def prepare_attention(self, compute_dtype=None):
        return self._vlm.prepare_attention(compute_dtype)

    @staticmethod
    def decode(ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def __getattr__(self, name: str):  # image_token_id, encode_image_inputs, resolution, ...: the VLM's
        return getattr(self._vlm, name)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2,
                    help="every mode runs once per round; the order reverses every round (noise falls on all)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.new_tokens, args.concurrency = min(args.requests, 6), min(args.new_tokens, 4), [1, 3]
        args.rounds = 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def make_requests(spec: common.BenchSpec, n: int, seed: int) -> list[tuple[list[int], torch.Tensor]]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    return [(common.render_prompt(spec, rng, 1), torch.randn(1, 3, spec.image_size, spec.image_size, generator=g))
            for _ in range(n)]


def one_at_a_time(vlm, requests, n_new: int, device) -> tuple[float, list[list[int]], list[float]]:
    outs, lat = [], []

    def worker() -> None:
        for ids, pix in requests:
            t = time.perf_counter()
            with torch.no_grad():
                outs.append(vlm.generate(torch.tensor([ids], device=device), None, pix.to(device),
                                         max_new_tokens=n_new, stop_token_ids=[])[0])
            common.sync(device)
            lat.append(time.perf_counter() - t)

    # In a worker thread, as the engine's decoding runs: on a loaded CPU the main thread's OpenMP team
    # behaves differently (measured 3-6x slower on tiny ops here), which would flatter the engine.
    t0 = time.perf_counter()
    th = threading.Thread(target=worker)
    th.start()
    th.join()
    return time.perf_counter() - t0, outs, lat


def with_engine(model, requests, n_new: int, concurrency: int, max_batch: int, device):
    engine = Engine(model, max_batch_size=max_batch, max_queue=len(requests))
    engine.start()
    outs: list[list[int] | None] = [None] * len(requests)
    lat = [0.0] * len(requests)
    next_index = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            done = threading.Event()
            ids, pix = requests[i]
            job = Job(ids, pix.to(device), SamplingParams(max_tokens=n_new, ignore_eos=True),
                      emit=lambda kind, data, d=done: d.set() if kind in ("done", "error") else None)
            t = time.perf_counter()
            engine.submit(job)
            done.wait()
            lat[i] = time.perf_counter() - t
            assert job.finish_reason == "length", job.finish_reason
            outs[i] = list(job.tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    stats = engine.stats()
    engine.stop()
    return wall, outs, lat, stats


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.setup_torch(args.threads or None)
    device = torch.device(args.device)
    spec = common.SPECS["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        vlm = common.load_ours(common.save_llava(spec, Path(tmp) / "llava", args.seed)).to(device).eval()
    model = _BenchModel(vlm, spec)
    requests = make_requests(spec, args.requests, args.seed)
    n_tokens = args.requests * args.new_tokens
    print(f"serve: device={device} threads={torch.get_num_threads()} shape={'quick' if args.quick else 'full'} "
          f"requests={args.requests} new_tokens={args.new_tokens} max_batch_size={args.max_batch_size} "
          f"rounds={args.rounds}")
    # Warm-up outside the timings: one generation and one engine request.
    one_at_a_time(vlm, requests[:1], 2, device)
    with_engine(model, requests[:1], 2, 1, 1, device)
    modes = ["one_at_a_time"] + [f"concurrency={c}" for c in args.concurrency]
    results = {m: {"wall_s": 0.0, "lat": [], "outs": None} for m in modes}
    for rnd in range(args.rounds):
        for mode in (modes if rnd % 2 == 0 else modes[::-1]):
            if mode == "one_at_a_time":
                wall, outs, lat = one_at_a_time(vlm, requests, args.new_tokens, device)
            else:
                c = int(mode.split("=")[1])
                wall, outs, lat, stats = with_engine(model, requests, args.new_tokens, c, args.max_batch_size,
                                                     device)
                results[mode]["max_batch"] = stats["max_batch"]
            r = results[mode]
            r["wall_s"] += wall
            r["lat"] += lat
            r["outs"] = r["outs"] or outs
    reference = results["one_at_a_time"]["outs"]
    for r in results.values():
        r["requests_per_s"] = args.requests * args.rounds / r["wall_s"]
        r["tokens_per_s"] = n_tokens * args.rounds / r["wall_s"]
        r["mean_latency_s"] = sum(r["lat"]) / len(r["lat"])
    for mode in modes:
        r = results[mode]
        r["ratio"] = r["tokens_per_s"] / results["one_at_a_time"]["tokens_per_s"]
        r["match"] = sum(a == b for a, b in zip(r["outs"], reference)) / len(reference)
        batch = f" max_batch={r['max_batch']}" if "max_batch" in r else ""
        print(f"{mode:<16} requests_per_s={r['requests_per_s']:.3f} tokens_per_s={r['tokens_per_s']:.1f} "
              f"mean_latency_s={r['mean_latency_s']:.2f} ratio={r['ratio']:.2f} match={r['match']:.2f}{batch}")
    return results


if __name__ == "__main__":
    main()
