"""DPO training steps: our stage-dpo step against trl's DPOTrainer, on the same LLaVA weights and pairs.

    python benchmarks/dpo_step.py                 # the benchmark shape (benchmarks/common.py SPECS["full"])
    python benchmarks/dpo_step.py --pairs 8 --steps 6 --threads 2
    python benchmarks/dpo_step.py --quick         # tiny shapes (tests)

Both sides start from ONE saved transformers `LlavaForConditionalGeneration` directory (common.save_llava):
the vision tower frozen, LoRA (`--rank`, alpha 2r, no dropout) on every linear layer of the LM's blocks
(q/k/v/o/gate/up/down), the projector training; AdamW with the same learning rate; sigmoid DPO, `--beta`.
- `ours`: the directory read by `VLM.from_pretrained`, LoRA by `model.stages.apply_lora`, the step trainer/
  pref_trainer.py runs per micro-batch: `pair_features` (the tower once per pair's image) -> `pair_logps` (one
  forward over [chosen...; rejected...], summed log-probs at target rows only) -> `reference_logps` (adapters
  off + the projector snapshot of `Reference`, the tower's features reused) -> `preference_loss` -> backward ->
  AdamW step.
- `trl`: the directory read by transformers, trl 1.x's `DPOTrainer` with a peft `LoraConfig` on the same
  modules and `modules_to_save=["multi_modal_projector"]` (so the projector trains and the reference, adapters
  disabled, uses the original projector, as ours does); gradient checkpointing off as on our side; its
  `training_step` (its own loss: the policy forward over [chosen; rejected] with the images repeated for both
  sides, then the reference forward with adapters disabled) then the AdamW step. Its batch is what trl's
  `DataCollatorForVisionPreference` makes of these pairs (the same token rows, `completion_mask` = the labelled
  answer, `pixel_values` repeated for chosen and rejected), built directly: the bench model has no tokenizer.
Pairs (`--pairs` B): a one-image ChatML prompt of the spec, two answers of the spec's answer lengths (+
`<|im_end|>`), random normalised pixels; the same token rows on both sides.

Method: `--warmup` untimed steps per side, then `--steps` rounds; each round runs one step per side, the side
going first alternating. Step time = the median wall time (and process CPU time). Peak memory (skipped by
`--no-memory`): one more step per side under torch's CPU memory profiler (common.peak_step_bytes: the running
sum of the allocations and frees the profiler records per op; CUDA: max_memory_allocated) plus the
parameters, gradients and optimizer state resident at the step's start (common.resident_bytes). The same
measure for an SFT step of ours on the same 2B sequences (each with its own image, the loss at target rows):
the `pairs_vs_sft` line.

Output: `dpo_step_s ours=X trl=Y ratio=X/Y`, `dpo_cpu_s ...`, `dpo_steps_per_s ... speedup=ours/trl`,
`dpo_peak_mb ours=.. trl=.. ratio=..`, `pairs_vs_sft_peak_mb dpo=.. sft=.. ratio=..`, a `loss_first` line (both
sides start at ln 2) and a `logps_chosen_first` line (the first step's mean chosen log-prob, ours and trl's own
`logps/chosen`: equal, the weights and rows being the same). `main()` returns the figures. Exit status 2 when trl or peft is missing.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402
from qwenvl_lab.core.loss import IGNORE_INDEX  # noqa: E402
from qwenvl_lab.dataset.pref_data import PairCollator  # noqa: E402
from qwenvl_lab.model.preference import Reference, pair_features, pair_logps, reference_logps  # noqa: E402
from qwenvl_lab.model.stages import apply_lora, set_trainable  # noqa: E402
from qwenvl_lab.model.train_config import LoraSettings  # noqa: E402
from qwenvl_lab.trainer.pref_loss import preference_loss  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast  # noqa: E402

from benchmarks import common  # noqa: E402

try:  # trl (and its datasets) are test dependencies, not the package's: without them main() says so
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    MISSING = None
except ImportError as e:  # pragma: no cover - the test environment has them
    MISSING = e.name

LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (SPECS['quick']) and few steps")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per step (default 4; --quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory steps")
    args = ap.parse_args(argv)
    args.pairs = args.pairs or (2 if args.quick else 4)
    args.steps = args.steps or (2 if args.quick else 5)
    return args


# ----- the pairs ---------------------------------------------------------------------------------------
def make_pairs(spec: common.BenchSpec, n: int, seed: int = 0) -> list[dict]:
    """`n` pairs as dataset/pref_data.py `PrefDataset` items: one image, a shared prompt, two answers."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        prompt = common.render_prompt(spec, rng, 1)
        sides = {}
        for side in ("chosen", "rejected"):
            answer = [rng.randrange(spec.n_text) for _ in range(rng.randint(*spec.answer_len))] + [spec.im_end]
            sides[f"{side}_input_ids"] = torch.tensor(prompt + answer)
            sides[f"{side}_labels"] = torch.tensor([IGNORE_INDEX] * len(prompt) + answer)
        pix = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)  # [1, 3, H, W]
        items.append({**sides, "pixel_values": pix, "n_images": 1, "id": f"pair-{i}", "skipped": []})
    return items


def trl_batch(batch: dict) -> dict:
    """trl's vision collator output for the same rows: completion_mask = the labelled answer, the pixels of
    each pair repeated for its chosen and its rejected row."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],  # [2B, T]
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),  # [2B, T]
            "pixel_values": torch.cat([batch["pixel_values"], batch["pixel_values"]])}  # [2B, 3, H, W]


def sft_batch(batch: dict) -> dict:
    """The same 2B sequences as an SFT batch: each row with its own image, loss at the labelled rows."""
    n = batch["input_ids"].shape[0]
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"],
            "pixel_values": torch.cat([batch["pixel_values"], batch["pixel_values"]]),
            "image_counts": torch.ones(n, dtype=torch.long)}


# ----- the two sides ---------------------------------------------------------------------------------
def build_ours(path: Path, args):
    vlm = common.load_ours(path)
    apply_lora(vlm, LoraSettings(r=args.rank, alpha=2 * args.rank, dropout=0.0))
    set_trainable(vlm, "dpo")
    vlm.train()
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=args.lr)
    return vlm, Reference(vlm), opt


def ours_loss(vlm, ref: Reference, batch: dict, beta: float) -> torch.Tensor:
    """trainer/pref_trainer.py's micro-batch: the towers once, the pair forward, the reference, the loss."""
    ids, mask, labels, counts = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["image_counts"]
    feats = pair_features(vlm, batch["pixel_values"])  # [B, T_img, C]
    logps, n = pair_logps(vlm, ids, mask, labels, counts, feats)  # [2B], [2B]
    ref_logps = reference_logps(vlm, ref, ids, mask, labels, counts, feats, batch["pixel_values"])  # [2B]
    B = logps.shape[0] // 2
    out = preference_loss("sigmoid", logps[:B], logps[B:], n[:B], n[B:], ref_logps[:B], ref_logps[B:], beta=beta)
    return out.loss, float(logps[:B].detach().mean())


def _processor(spec: common.BenchSpec):
    """A LlavaProcessor for trl's checks only (our batches bypass it): a word-level tokenizer whose pad and
    image tokens carry the spec's ids, and a CLIP image processor of the spec's size."""
    vocab = {"<unk>": 0, "<pad>": spec.eod, "<|im_end|>": spec.im_end, "<image>": spec.image_token}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image = CLIPImageProcessor(size={"shortest_edge": spec.image_size},
                               crop_size={"height": spec.image_size, "width": spec.image_size})
    return LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=spec.patch_size,
                          vision_feature_select_strategy="default")


def build_trl(path: Path, spec: common.BenchSpec, args, workdir: Path):
    model = common.load_reference(path)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, bias="none",
                      target_modules=LM_LINEAR, modules_to_save=["multi_modal_projector"])
    cfg = DPOConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=args.pairs, beta=args.beta,
                    learning_rate=args.lr, gradient_checkpointing=False, max_length=None, report_to=[],
                    use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, logging_strategy="no",
                    save_strategy="no", loss_type=["sigmoid"])
    rows = Dataset.from_list([{"images": [], "prompt": "p", "chosen": "a", "rejected": "b"}])
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=rows, processing_class=_processor(spec),
                         peft_config=lora, data_collator=lambda x: x)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); training_step divides by it
    opt = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=args.lr)
    return trainer, opt


# ----- measuring ---------------------------------------------------------------------------------------
def _timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def make_steps(args, ours, trainer, trl_opt, batch: dict, losses: dict) -> dict:
    vlm, ref, opt = ours
    tbatch = trl_batch(batch)

    def ours_step():
        loss, chosen = ours_loss(vlm, ref, batch, args.beta)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.setdefault("ours", []).append(float(loss.detach()))
        losses.setdefault("ours_logps_chosen", []).append(chosen)

    def trl_step():
        loss = trainer.training_step(trainer.model, dict(tbatch))
        trl_opt.step()
        trl_opt.zero_grad(set_to_none=True)
        losses.setdefault("trl", []).append(float(loss.detach()))
        losses["trl_logps_chosen"] = trainer._metrics["train"]["logps/chosen"]  # trl's own log, one per step

    return {"ours": ours_step, "trl": trl_step}


def time_sides(steps: dict, rounds: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):  # the side going first alternates
            times[k].append(_timed(steps[k]))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}


def peak_mb(fn, model, opt, device) -> float:
    """Resident parameters + grads + optimizer state, plus the step's own peak allocation (MiB)."""
    return (common.resident_bytes(model, opt) + common.peak_step_bytes(fn, device)) / 2**20


def sft_peak_mb(path: Path, args, batch: dict, device) -> float:
    """Our SFT step on the same 2B sequences (same model, LoRA and projector training, same optimizer)."""
    vlm = common.load_ours(path)
    apply_lora(vlm, LoraSettings(r=args.rank, alpha=2 * args.rank, dropout=0.0))
    set_trainable(vlm, "sft")
    vlm.train()
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=args.lr)
    sb = sft_batch(batch)

    def step():
        vlm(**sb).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state exists from here on, as in the DPO measurement
    return peak_mb(step, vlm, opt, device)


def _line(name: str, a: str, x: float, b: str, y: float, unit_fmt: str = "{:.4f}") -> str:
    return f"{name}  {a}={unit_fmt.format(x)} {b}={unit_fmt.format(y)} ratio={x / y:.3f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if MISSING is not None:
        print(f"dpo_step: {MISSING} is not installed (pip install -e '.[dev]')", file=sys.stderr)
        raise SystemExit(2)
    common.setup_torch(args.threads)
    common.set_malloc("retain")
    device = torch.device("cpu")
    spec = common.SPECS["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        path = common.save_llava(spec, Path(tmp) / "llava", seed=0)
        batch = dict(PairCollator(spec.eod)(make_pairs(spec, args.pairs)))
        ours = build_ours(path, args)
        trainer, trl_opt = build_trl(path, spec, args, Path(tmp))
        losses: dict = {}
        steps = make_steps(args, ours, trainer, trl_opt, batch, losses)
        t = time_sides(steps, args.steps, args.warmup)
        res = {"pairs": args.pairs, "tokens_per_pair": int(batch["attention_mask"].sum()) / args.pairs,
               "ours_step_s": t["ours"][0], "trl_step_s": t["trl"][0], "ours_cpu_s": t["ours"][1],
               "trl_cpu_s": t["trl"][1], "ours_loss_first": losses["ours"][0], "trl_loss_first": losses["trl"][0]}
        print(f"dpo_step spec={'quick' if args.quick else 'full'} pairs={args.pairs} "
              f"tokens_per_pair={res['tokens_per_pair']:.1f} threads={torch.get_num_threads()} rounds={args.steps}")
        print(_line("dpo_step_s", "ours", res["ours_step_s"], "trl", res["trl_step_s"]))
        print(_line("dpo_cpu_s", "ours", res["ours_cpu_s"], "trl", res["trl_cpu_s"]))
        print(f"dpo_steps_per_s  ours={1 / res['ours_step_s']:.3f} trl={1 / res['trl_step_s']:.3f} "
              f"speedup={res['trl_step_s'] / res['ours_step_s']:.2f}")
        print(f"loss_first  ours={res['ours_loss_first']:.6f} trl={res['trl_loss_first']:.6f} ln2={math.log(2):.6f}")
        res["ours_logps_chosen_first"] = losses["ours_logps_chosen"][0]
        res["trl_logps_chosen_first"] = losses["trl_logps_chosen"][0]
        print(f"logps_chosen_first  ours={res['ours_logps_chosen_first']:.4f} "
              f"trl={res['trl_logps_chosen_first']:.4f}")  # the same weights and rows: the same log-probs
        if not args.no_memory:
            res["ours_peak_mb"] = peak_mb(steps["ours"], ours[0], ours[2], device)
            res["trl_peak_mb"] = peak_mb(steps["trl"], trainer.model, trl_opt, device)
            res["sft_peak_mb"] = sft_peak_mb(path, args, batch, device)
            print(_line("dpo_peak_mb", "ours", res["ours_peak_mb"], "trl", res["trl_peak_mb"], "{:.1f}"))
            print(_line("pairs_vs_sft_peak_mb", "dpo", res["ours_peak_mb"], "sft", res["sft_peak_mb"], "{:.1f}"))
    return res


if __name__ == "__main__":
    main()
