"""The demo recipe end to end at a small size, as a user runs it: `train.py` (both stages) then `test.py`.

    python benchmarks/demo_run.py [--out DIR] [--n-train 600] [--steps 30]

It makes the shapes data and its vocabulary, trains `configs/demo/stage1.yaml` and
`configs/demo/stage2_sft.yaml` for `--steps` optimizer steps each (paths overridden on the command line),
and asks `test.py` about a held-out image. Every step is its own process through the entry points, so on
a GPU machine the Hugging Face Trainer / accelerate placement, autocast and the attention resolution run
exactly as in a user's run (the device is whatever the Trainer picks). Prints each command's wall time,
the device the run used, the first and last logged loss of each stage and the answer (a few steps' model may answer with nothing
but its end of turn); exit status 1 when a step fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str]) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, seconds) of `python argv...` in the repository root."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


def _losses(run: Path) -> str:
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if '"loss"' in ln]
    losses = [r["loss"] for r in rows if "loss" in r]
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} logged steps" if losses else "no loss logged"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per stage")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(tmp.name if tmp else args.out)
    data, s1, s2 = out / "shapes", out / "stage1", out / "stage2"
    common = [f"data_path=[{data}/train.jsonl]", f"image_folder={data}", f"max_steps={args.steps}",
              "logging_steps=1", "save_steps=100000"]
    steps = [
        ("data", ["-m", "qwenvl_lab.dataprocess.make_shapes", str(data), "--n-train", str(args.n_train), "--n-val", "20",
                  "--seed", "0", "--size", "32"]),
        ("vocab", ["-m", "qwenvl_lab.dataprocess.make_vocab", "--data", f"{data}/train.jsonl", "--merges", "300",
                   "--out", f"{data}/vocab"]),
        ("stage1", ["train.py", "configs/demo/stage1.yaml", *common, f"model.tokenizer={data}/vocab",
                    f"output_dir={s1}"]),
        ("stage2", ["train.py", "configs/demo/stage2_sft.yaml", *common, f"init_from={s1}/final",
                    f"output_dir={s2}"]),
    ]
    for name, argv_ in steps:
        code, out_, err, secs = _run(argv_)
        text = out_ + err
        print(f"demo_run: {name}: exit {code} in {secs:.1f} s", flush=True)
        if code != 0:
            print(text[-4000:])
            return 1
        if name.startswith("stage"):
            used = [ln for ln in text.splitlines() if "attention" in ln and ("->" in ln or "first step" in ln)]
            print(f"demo_run: {name}: {_losses(out / name)}; " + (used[-1].split(": ", 1)[-1] if used else ""))
    record = json.loads((data / "val.jsonl").read_text().splitlines()[0])
    question = record["messages"][0]["content"].replace("<image>", "").strip()
    code, text, err, secs = _run(["test.py", "--model", str(s2 / "final"), "--image",
                                  str(data / record["images"][0]), "--prompt", question, "--max-new-tokens", "8"])
    answer = text.strip().splitlines()[-1] if text.strip() else ""  # test.py prints the answer on stdout
    if code != 0:
        print(err[-4000:])
    print(f"demo_run: test.py: exit {code} in {secs:.1f} s; question {question!r} -> answer {answer!r} "
          f"(reference {record['messages'][1]['content']!r})")
    if tmp:
        tmp.cleanup()
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
