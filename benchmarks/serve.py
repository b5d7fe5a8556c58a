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
rarely flip a near-tie); a second line per mode gives time to first token (`ttft_p50_s`, `ttft_p95_s`: submit
to the first token) and inter-token latency (`itl_p50_ms`, `itl_p95_ms`: between a request's consecutive
tokens), from each token's arrival (the streamer of `vlm.generate`, the engine's text deltas).
`chat_3_turns`: `--chat-runs` conversations of 3 turns about the same image through one engine, one
request at a time (each turn re-sends the conversation: the previous prompt, the answer and a new
question, as an OpenAI client does); per turn its TTFT p50 and, for turns 2 and 3, the ratio to turn 1's
(the image cache and the prefix cache make later turns prefill only their new tokens), and whether each
turn's tokens equal `vlm.generate` on the whole prompt.
`bound`: what batching can gain at most here, measured with the engine's own decode batch at the highest
concurrency C (`compute_bound`): `decode_bound` = C x one decode step of 1 row / one decode step of C rows
(the step's time grows with its rows: the weights are read once per step, but every row's matmul work and
its attention over its own KV still add up), and the best throughput of whole requests, C prompts prefilled
(the faster of one forward and the engine's pieces of `prefill_chunk` tokens, both printed: a prompt's
prefill is compute-bound, and one forward of all C prompts was the slower on a 2-core CPU) and decoded
together; the concurrency-C figure is printed as a fraction of each. `run_bound` is that best throughput
over one-at-a-time's: the highest `ratio` whole requests can show against the same baseline.
Every mode runs once per round (`--rounds`, default 2), in the opposite order each round, and the figures
add up the rounds: slow drifts of a shared machine's load fall on every mode.
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
from qwenvl_lab.serve.decode import DecodeBatch, Row, SamplingParams  # noqa: E402
from qwenvl_lab.serve.engine import PREFILL_CHUNK, Engine, Job  # noqa: E402

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
    ap.add_argument("--chat-runs", type=int, default=4, help="3-turn same-image conversations (0 skips them)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.new_tokens, args.concurrency = min(args.requests, 6), min(args.new_tokens, 4), [1, 3]
        args.rounds, args.chat_runs = 1, min(args.chat_runs, 1)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def make_requests(spec: common.BenchSpec, n: int, seed: int) -> list[tuple[list[int], torch.Tensor]]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    return [(common.render_prompt(spec, rng, 1), torch.randn(1, 3, spec.image_size, spec.image_size, generator=g))
            for _ in range(n)]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def _gaps(times: list[float], start: float) -> tuple[float | None, list[float]]:
    """(time to first token, inter-token gaps) of one request's token arrival times."""
    if not times:
        return None, []
    return times[0] - start, [b - a for a, b in zip(times, times[1:])]


def one_at_a_time(vlm, requests, n_new: int, device) -> tuple[float, list[list[int]], list[float], list]:
    outs, lat, timing = [], [], []

    def worker() -> None:
        for ids, pix in requests:
            arrivals: list[float] = []
            t = time.perf_counter()
            with torch.no_grad():
                outs.append(vlm.generate(torch.tensor([ids], device=device), None, pix.to(device),
                                         max_new_tokens=n_new, stop_token_ids=[],
                                         streamer=lambda b, tok, a=arrivals: a.append(time.perf_counter()))[0])
            common.sync(device)
            lat.append(time.perf_counter() - t)
            timing.append(_gaps(arrivals, t))

    # In a worker thread, as the engine's decoding runs: on a loaded CPU the main thread's OpenMP team
    # behaves differently (measured 3-6x slower on tiny ops here), which would flatter the engine.
    t0 = time.perf_counter()
    th = threading.Thread(target=worker)
    th.start()
    th.join()
    return time.perf_counter() - t0, outs, lat, timing


def _engine_job(engine: Engine, ids: list[int], pix: torch.Tensor, n_new: int) -> tuple[Job, float, list[float]]:
    """Submit one greedy request and wait for it: (job, submit time, token arrival times)."""
    done = threading.Event()
    arrivals: list[float] = []

    def emit(kind: str, data) -> None:
        if kind == "delta":  # the bench model's text is one id per token, so every token is a delta
            arrivals.append(time.perf_counter())
        elif kind in ("done", "error"):
            done.set()

    job = Job(ids, pix, SamplingParams(max_tokens=n_new, ignore_eos=True), emit=emit)
    t = time.perf_counter()
    engine.submit(job)
    done.wait()
    assert job.finish_reason == "length", job.finish_reason
    return job, t, arrivals


def with_engine(model, requests, n_new: int, concurrency: int, max_batch: int, device):
    engine = Engine(model, max_batch_size=max_batch, max_queue=len(requests))
    engine.start()
    outs: list[list[int] | None] = [None] * len(requests)
    lat = [0.0] * len(requests)
    timing: list = [None] * len(requests)
    next_index = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            ids, pix = requests[i]
            job, t, arrivals = _engine_job(engine, ids, pix.to(device), n_new)
            lat[i] = time.perf_counter() - t
            timing[i] = _gaps(arrivals, t)
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
    return wall, outs, lat, stats, timing


def _batch_costs(model, requests, n_new: int, chunk: int | None = None) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) of one DecodeBatch holding `requests` together: their prompts
    prefilled (no caches) in one forward, or in pieces of about `chunk` tokens, then `n_new` decode steps of
    all rows (the engine's own step)."""
    batch = DecodeBatch(model)
    batch.start([Row(ids, pix, SamplingParams(max_tokens=n_new, ignore_eos=True)) for ids, pix in requests])
    t = time.perf_counter()
    while batch.pending:
        batch.prefill(chunk)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_new):
        batch.advance(batch.next_tokens(), [True] * len(batch))
    return prefill, (time.perf_counter() - t) / max(n_new, 1)


def compute_bound(model, requests, n_new: int, rows: int) -> dict:
    """What batching `rows` requests can gain at most on this machine, from the engine's own kernels:
    `decode_bound` = rows x (one decode step of 1 row) / (one decode step of `rows` rows), and
    `bound_tokens_per_s` = rows x n / (P_rows + n t_rows), the throughput of `rows` requests prefilled (P: the
    faster of one forward and the engine's default pieces) and decoded together (t per step, n = `n_new`
    steps): no scheduling, no waiting. Run in a worker thread (as the engine's decoding is)."""
    out: dict = {}
    batch = (requests * rows)[:rows]

    def worker() -> None:
        with torch.no_grad():
            _batch_costs(model, requests[:1], 2)  # warm-up, and any first-use work of a large batch
            _batch_costs(model, batch, 2, PREFILL_CHUNK)
            p1, t1 = _batch_costs(model, requests[:1], n_new)
            whole, tr = _batch_costs(model, batch, n_new)
            pieces, _ = _batch_costs(model, batch, 0, PREFILL_CHUNK)
        pr = min(whole, pieces)
        out.update(prefill_1_s=p1, step_1_s=t1, prefill_rows_s=pr, prefill_rows_whole_s=whole,
                   prefill_rows_pieces_s=pieces, step_rows_s=tr, rows=rows,
                   decode_bound=rows * t1 / tr, bound_tokens_per_s=rows * n_new / (pr + n_new * tr))

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    return out


def chat_turns(vlm, model, spec: common.BenchSpec, runs: int, n_new: int, seed: int, device) -> dict:
    """`runs` 3-turn conversations about one image each through one engine (module docstring)."""
    rng = random.Random(seed + 1)
    g = torch.Generator().manual_seed(seed + 1)
    newline = spec.n_text - 1
    engine = Engine(model, max_batch_size=4, max_queue=4)
    engine.start()
    ttft: dict[int, list[float]] = {1: [], 2: [], 3: []}
    asked = []  # (prompt, image, the engine's answer) of every turn, checked against vlm.generate afterwards
    try:
        for _ in range(runs):
            pix = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g).to(device)
            ids = common.render_prompt(spec, rng, 1)
            for turn in (1, 2, 3):
                job, t, arrivals = _engine_job(engine, ids, pix, n_new)
                ttft[turn].append(arrivals[0] - t)
                asked.append((ids, pix, list(job.tokens)))
                question = [rng.randrange(spec.n_text - 1) for _ in range(rng.randint(*spec.user_len))]
                ids = ids + list(job.tokens) + [spec.im_end, newline, spec.im_start, 1, newline] + question + [
                    spec.im_end, newline, spec.im_start, 2, newline]  # the answer, then a new user turn
    finally:
        cache = engine.cache_stats()
        engine.stop()
    # The references run after the engine's turns: a computation in this thread between turns would leave
    # its OpenMP workers spinning on the cores while the engine's next turn starts.
    with torch.no_grad():
        match = [tokens == vlm.generate(torch.tensor([ids], device=device), None, pix, max_new_tokens=n_new,
                                        stop_token_ids=[])[0] for ids, pix, tokens in asked]
    first = _percentile(ttft[1], 0.5)
    return {"ttft_p50_s": {k: _percentile(v, 0.5) for k, v in ttft.items()},
            "ratio_to_turn_1": {k: _percentile(v, 0.5) / first for k, v in ttft.items() if k > 1},
            "match": sum(match) / len(match), "cache": cache}


def _latency_figures(r: dict) -> None:
    firsts = [t[0] for t in r["timing"] if t[0] is not None]
    gaps = [g for t in r["timing"] for g in t[1]]
    r["ttft_p50_s"], r["ttft_p95_s"] = _percentile(firsts, 0.5), _percentile(firsts, 0.95)
    r["itl_p50_ms"], r["itl_p95_ms"] = 1e3 * _percentile(gaps, 0.5), 1e3 * _percentile(gaps, 0.95)


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
    results = {m: {"wall_s": 0.0, "lat": [], "outs": None, "timing": []} for m in modes}
    for rnd in range(args.rounds):
        for mode in (modes if rnd % 2 == 0 else modes[::-1]):
            if mode == "one_at_a_time":
                wall, outs, lat, timing = one_at_a_time(vlm, requests, args.new_tokens, device)
            else:
                c = int(mode.split("=")[1])
                wall, outs, lat, stats, timing = with_engine(model, requests, args.new_tokens, c,
                                                             args.max_batch_size, device)
                results[mode]["max_batch"] = stats["max_batch"]
            r = results[mode]
            r["wall_s"] += wall
            r["lat"] += lat
            r["timing"] += timing
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
        _latency_figures(r)
        print(f"{mode:<16} ttft_p50_s={r['ttft_p50_s']:.4f} ttft_p95_s={r['ttft_p95_s']:.4f} "
              f"itl_p50_ms={r['itl_p50_ms']:.2f} itl_p95_ms={r['itl_p95_ms']:.2f}")
    top = max(args.concurrency)
    if top > 1:
        b = results["bound"] = compute_bound(model, requests, args.new_tokens, min(top, args.max_batch_size))
        got = results[f"concurrency={top}"]
        b["run_bound"] = b["bound_tokens_per_s"] / results["one_at_a_time"]["tokens_per_s"]
        print(f"bound rows={b['rows']} step_1_ms={1e3 * b['step_1_s']:.2f} step_rows_ms={1e3 * b['step_rows_s']:.2f} "
              f"prefill_1_s={b['prefill_1_s']:.4f} prefill_rows_s={b['prefill_rows_s']:.4f} "
              f"(whole={b['prefill_rows_whole_s']:.4f} pieces={b['prefill_rows_pieces_s']:.4f}) "
              f"decode_bound={b['decode_bound']:.2f} run_bound={b['run_bound']:.2f} "
              f"concurrency={top}_of_decode_bound={got['ratio'] / b['decode_bound']:.2f} "
              f"of_run_bound={got['tokens_per_s'] / b['bound_tokens_per_s']:.2f}")
    if args.chat_runs > 0:
        chat = chat_turns(vlm, model, spec, args.chat_runs, args.new_tokens, args.seed, device)
        results["chat_3_turns"] = chat
        for turn, t in chat["ttft_p50_s"].items():
            vs = f" vs_turn_1={chat['ratio_to_turn_1'][turn]:.2f}" if turn > 1 else ""
            print(f"chat_3_turns     turn={turn} ttft_p50_s={t:.4f}{vs} match={chat['match']:.2f}")
    return results


if __name__ == "__main__":
    main()
