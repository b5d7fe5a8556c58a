"""The greedy head's screens (`qwen.generation.ScreenedHead`) timed one by one on this CPU.

    python benchmarks/screen_head.py              # the benchmark model's head: 151,936 x 512, fp32
    python benchmarks/screen_head.py --quick      # a tiny head (tests)
    python benchmarks/screen_head.py --from-model # the benchmark VLM's own head and decode-time hidden states

For each screen this torch build has (fp32, fp16, bf16, int8, int8x8; bf16 also where it is emulated), forced, at 1 row and
at `--rows` rows: milliseconds per `argmax` (approximate pass, bound, candidates, fp32 recomputation; best of
`--repeats` after a warm-up), the mean number of candidates recomputed per row, and whether its tokens equal the
fp32 screen's. Then the screens `ScreenedHead` picks on this CPU for one row (`small`) and for a batch (`large`).
The hidden states are normal draws scaled to the norm of the benchmark LM's final RMSNorm output (sqrt(K)), or
with `--from-model` the states the serving engine's decode batch picks from: `--rows` requests of
benchmarks/serve.py prefilled together and decoded 4 steps (whose logits leave fewer candidates than the draws').
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402
from qwenvl_lab.qwen.generation import ScreenedHead  # noqa: E402
from qwenvl_lab.serve.decode import DecodeBatch, Row, SamplingParams  # noqa: E402

from benchmarks import common, serve  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--rows", type=int, default=32, help="the batch's rows (the other size is 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="a tiny head (for tests)")
    ap.add_argument("--from-model", action="store_true",
                    help="the benchmark VLM's head and decode-time hidden states (benchmarks/common.py, --quick: tiny)")
    args = ap.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.rows, args.repeats = 3000, 48, 8, 2
    return args


def _timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _candidates(screen: ScreenedHead, name: str, hidden: torch.Tensor) -> float:
    """Mean candidates per row: the approximate logits within the screen's threshold of each row's maximum."""
    rows, _ = screen.candidates(*screen._approx(name, hidden))
    return len(rows) / hidden.shape[0]


def model_states(rows: int, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(head weight [V, K], hidden states [rows, K]) of the benchmark VLM's decode batch after 4 steps."""
    spec = common.SPECS["quick" if quick else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        vlm = common.load_ours(common.save_llava(spec, Path(tmp) / "llava", 0)).eval()
    model = serve._BenchModel(vlm, spec)
    batch = DecodeBatch(model)
    if batch.screen is None:
        raise SystemExit("screen_head: --from-model needs the screened head (our Qwen LM, an fp32 head on a CPU)")
    batch.start([Row(ids, pix, SamplingParams(max_tokens=8, ignore_eos=True))
                 for ids, pix in serve.make_requests(spec, rows, 0)])
    with torch.no_grad():
        while batch.pending:
            batch.prefill(None)
        for _ in range(4):
            batch.advance(batch.next_tokens(), [True] * len(batch))
    return batch.head.weight.detach(), batch.logits.float()  # the decode batch keeps hidden states there


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    if args.from_model:
        weight, states = model_states(args.rows, args.quick)
        args.vocab, args.hidden = weight.shape
    else:
        weight = torch.randn(args.vocab, args.hidden, generator=g) * 0.02
        states = None
    print(f"screen_head: vocab={args.vocab} hidden={args.hidden} rows=1,{args.rows} threads={torch.get_num_threads()}"
          f" hidden_states={'model' if args.from_model else 'random'}")
    names = [n for n in ScreenedHead.SCREENS if ScreenedHead.supported(n)]
    out: dict = {}
    for rows in (1, args.rows):
        hidden = states[:rows] if states is not None else torch.randn(rows, args.hidden, generator=g)  # norm ~ sqrt(K)
        ref = ScreenedHead(weight, screens=("fp32",)).argmax(hidden, weight, "fp32")
        for name in names:
            screen = ScreenedHead(weight, screens=(name,))
            ms = 1e3 * _timed(lambda s=screen, n=name, h=hidden: s.argmax(h, weight, n), args.repeats)
            same = bool(torch.equal(screen.argmax(hidden, weight, name), ref))
            cand = _candidates(screen, name, hidden)
            out[(name, rows)] = {"ms": ms, "candidates": cand, "same": same}
            print(f"screen={name:<6} rows={rows:<3} ms={ms:8.2f} candidates_per_row={cand:6.1f} same_as_fp32={same}")
    auto = ScreenedHead(weight)
    auto.argmax(torch.randn(args.rows, args.hidden, generator=g), weight)  # the batch screen is timed here
    out["chosen"] = {"small": auto.small, "large": auto.large}
    print(f"chosen small={auto.small} large={auto.large} (offered here: {','.join(auto.offered)})")
    return out


if __name__ == "__main__":
    main()
