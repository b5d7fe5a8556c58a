"""The original pair at real shapes on this machine: one training step and a short answer, beside the plan.

    python benchmarks/smoke_real.py                          # make smoke-real: this CPU, dtype auto
    python benchmarks/smoke_real.py --device cuda --dtype bf16
    python benchmarks/smoke_real.py --tiny                   # the same code path at tiny shapes (tests)

What runs (random weights, nothing downloaded): Qwen-1.8B-Chat's published config
(`configs/hub/Qwen--Qwen-1_8B-Chat.json`) + a SigLIP so400m/14-384-shaped tower
(`configs/hub/google--siglip-so400m-patch14-384.json`, 729 patch tokens) + the mlp2x_gelu projector,
set up by the training code itself (`trainer.run.build_model`) from the original recipe
`configs/qwen7b_siglip_lora.yaml` with its LM swapped: LoRA r128 on its targets, its separate projector
and LoRA learning rates, gradient checkpointing, the chosen dtype (`auto` = what `model/dtypes.py`
decides here; bf16 runs under autocast with fp32 trainable weights). One sample = ChatML user turn with
one image (729 placeholders) and text, an assistant answer (~64 text tokens in all); one AdamW step
(the trainer's parameter groups), then a 4-token greedy answer to the same prompt.

Printed: the dtype decision, trainable parameters, step and answer times, peak memory (CPU: peak RSS of
the process and its growth over the RSS before the model was built, and each phase's own peak — build,
forward, backward, optimizer — where Linux lets the peak be reset; CUDA: max_memory_allocated), each
beside `model.plan.predict_on_device` for the same config, device, dtype and shape (`DDP` on 1 device:
weights + bf16 autocast copies of the trainables + gradients + AdamW states + activations; step time =
the plan's FLOPs / (this device's matmul peak x the MFU measured on one block of this LM right after the
step, or `--mfu`)), with the ratio and whether it is within 25%. On a CPU the step's CPU time is compared
too (against the block's CPU-time rate): a machine shared with other jobs stretches wall time, not CPU
time. Exit status 1 when the loss is not finite or the answer is not `--new-tokens` tokens long.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every part is built from a config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import torch  # noqa: E402
from qwenvl_lab.core.config_io import load_config  # noqa: E402
from qwenvl_lab.core.loss import count_targets  # noqa: E402
from qwenvl_lab.model import dtypes  # noqa: E402
from qwenvl_lab.model import plan as P  # noqa: E402
from qwenvl_lab.model.train_config import TrainConfig  # noqa: E402
from qwenvl_lab.qwen import QWenConfig  # noqa: E402
from qwenvl_lab.trainer.optim import param_groups  # noqa: E402
from qwenvl_lab.trainer.run import build_model  # noqa: E402

from benchmarks.common import peak_rss_bytes, rss_bytes  # noqa: E402

RECIPE = ROOT / "configs" / "qwen7b_siglip_lora.yaml"
LM_CONFIG = ROOT / "configs" / "hub" / "Qwen--Qwen-1_8B-Chat.json"
TOWER_CONFIG = ROOT / "configs" / "hub" / "google--siglip-so400m-patch14-384.json"
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}
IM_START, IM_END, NL, USER, ASSISTANT = 151644, 151645, 198, 872, 77091  # Qwen-1 ChatML ids
IMG_START, IMG_END = 151647, 151648  # <|extra_1|>, <|extra_2|>
TOLERANCE = 0.25


def _tiny_files(tmp: Path) -> tuple[Path, Path]:
    """Small configs of the same families (the test's shapes)."""
    lm = json.loads(LM_CONFIG.read_text())
    lm.update(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2, kv_channels=16)
    tower = json.loads(TOWER_CONFIG.read_text())
    tower["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=28, patch_size=14)
    (tmp / "lm.json").write_text(json.dumps(lm))
    (tmp / "tower.json").write_text(json.dumps(tower))
    return tmp / "lm.json", tmp / "tower.json"


def train_config(dtype: str, lm_file: Path, tower_file: Path, lora_r: int):
    """The original recipe with Qwen-1.8B-Chat's config as the LM, random weights everywhere."""
    cfg = load_config(TrainConfig, str(RECIPE), [f"lora.r={lora_r}", f"lora.alpha={2 * lora_r}"])
    cfg.preset = None
    cfg.model = {
        "lm": "scratch", "lm_backend": "qwen", "lm_config": QWenConfig.from_pretrained(lm_file).to_dict(),
        "towers": [{"backend": "hf_siglip", "name_or_path": str(tower_file), "feature_layer": -2,
                    "pretrained": False}],
        "image_mode": "resize", "projector": "mlp2x_gelu", "dtype": DTYPES[dtype],
    }
    cfg.gradient_checkpointing = True
    cfg.per_device_train_batch_size = 1
    cfg.gradient_accumulation_steps = 1
    return cfg


def make_sample(n_image: int, text_tokens: int, answer_tokens: int, image_id: int, vocab: int, seed: int = 0):
    """ChatML ids of a user turn (one image + text) and an assistant answer: `n_image + text_tokens` ids;
    labels on the answer and its end of turn. Returns (prompt ids up to the reply header, ids, labels)."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(1000, min(vocab, 150000), (n,), generator=g).tolist()  # noqa: E731
    question = text_tokens - answer_tokens - 13  # the ChatML frame and the image span's ends take the rest
    prompt = ([IM_START, USER, NL, IMG_START] + [image_id] * n_image + [IMG_END, NL] + words(question)
              + [IM_END, NL, IM_START, ASSISTANT, NL])
    answer = words(answer_tokens) + [IM_END, NL]
    ids = prompt + answer
    labels = [-100] * len(prompt) + answer[:-1] + [-100]
    return prompt, torch.tensor([ids]), torch.tensor([labels])


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) so that the next phase's peak is its own (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _phase_peak_rss() -> int:
    """Peak RSS since the last `_reset_peak_rss` (VmHWM), else the process's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def _trim_heap() -> None:
    """Hand glibc's free heap back to the system (Linux), so that RSS counts what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _step(vlm, groups, opt, autocast, inputs: dict, max_grad_norm: float, sync, phase) -> tuple[float, float, float]:
    """One optimizer step; `phase(name, wall s)` after forward, backward and the optimizer. Returns (loss,
    wall s, CPU s) of the whole step."""
    vlm.train()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    with autocast:
        loss = vlm(**inputs).loss
    sync()
    t1 = time.perf_counter()
    phase("forward", t1 - t0)
    loss.backward()
    sync()
    t2 = time.perf_counter()
    phase("backward", t2 - t1)
    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    phase("optimizer", time.perf_counter() - t2)
    return loss.item(), wall, cpu


class _Phases:
    """`phase(name, wall s)`: records each phase's wall time and, on a CPU where Linux lets the peak be reset,
    its peak RSS growth over `rss_before` (the maximum over the steps)."""

    def __init__(self, cpu: bool, rss_before: int):
        self.cpu, self.rss_before = cpu, rss_before
        self.peaks: dict[str, int] = {}  # CPU: peak RSS growth of each phase over rss_before
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, wall: float = 0.0) -> None:
        self.seconds[name] = wall
        if self.cpu and _reset_peak_rss():
            growth = _phase_peak_rss() - self.rss_before
            self.peaks[name] = max(self.peaks.get(name, 0), growth)  # over the steps
            _reset_peak_rss()  # (this resets ru_maxrss as well: the process peak is the phases' maximum)


def _build(cfg, dev: torch.device, phase: _Phases):
    """The VLM as the trainer builds it, on `dev`; returns it and the build's wall time."""
    _reset_peak_rss()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        vlm = build_model(cfg).to(dev)
    build_s = time.perf_counter() - t0
    phase("build")
    return vlm, build_s


def _sample_tensors(vlm, text_tokens: int, batch: int, dev: torch.device):
    """The one sample: (prompt ids, input ids [batch, T], labels [batch, T], pixels [batch, 3, H, W])."""
    prompt, ids, labels = make_sample(vlm.tokens_per_image, text_tokens, 8,
                                      vlm.image_token_id, vlm.lm.get_input_embeddings().weight.shape[0])
    ids, labels = ids.to(dev).repeat(batch, 1), labels.to(dev).repeat(batch, 1)  # [batch, T]
    size = int(vlm.towers.image_size)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev).repeat(batch, 1, 1, 1)
    return prompt, ids, labels, pixels


def _optimizer(vlm, cfg, dev: torch.device):
    """The trainer's parameter groups and a (fused where it can be) AdamW over them."""
    groups = param_groups(vlm, learning_rate=cfg.learning_rate, projector_lr=cfg.projector_lr, vision_lr=0.0,
                          weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=dev.type in ("cpu", "cuda"))
    return groups, opt


def _step_peak(dev: torch.device, rss_before: int, phases: dict[str, int]) -> int:
    """Peak memory of the steps: CUDA's max allocated, or the process's peak RSS."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated()
    # VmHWM resets also reset ru_maxrss: the peak is the phases' maximum
    return rss_before + max(phases.values()) if phases else peak_rss_bytes()


def _answer(vlm, prompt: list[int], pixels: torch.Tensor, new_tokens: int, autocast, sync, dev: torch.device):
    """A greedy answer of `new_tokens` tokens to the sample's prompt and its wall time."""
    vlm.eval()
    t0 = time.perf_counter()
    with autocast:
        answer = vlm.generate(torch.tensor([prompt], device=dev), pixel_values=pixels[:1], max_new_tokens=new_tokens,
                              do_sample=False, stop_token_ids=[])[0]
    sync()
    return answer, time.perf_counter() - t0


def run(device: str = "cpu", dtype: str = "auto", tiny: bool = False, lora_r: int = 128, text_tokens: int = 64,
        new_tokens: int = 4, mfu: float | None = None, lm_config: Path | None = None, steps: int = 1,
        batch: int = 1) -> dict:
    """Build, step once, answer; returns the measured figures and the plan's predictions."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("smoke_real: --device cuda but torch sees no CUDA device")
    tmp = tempfile.TemporaryDirectory()
    lm_file, tower_file = _tiny_files(Path(tmp.name)) if tiny else (Path(lm_config or LM_CONFIG), TOWER_CONFIG)
    if tiny:
        lora_r = min(lora_r, 8)
    cfg = train_config(dtype, lm_file, tower_file, lora_r)
    decision = dtypes.auto_decision(dev)
    base = decision.dtype if dtype == "auto" else dtypes.NAMES[DTYPES[dtype]]

    dtype_name = DTYPES[dtype] if dtype != "auto" else None
    timings = []
    rss_before = rss_bytes()  # before the first block timing: its freed memory must not hide in the baseline
    if not mfu:  # the block is timed before the model exists and again after the step
        with contextlib.redirect_stdout(io.StringIO()):
            seq = int(P.meta_model(cfg, dev.type, dtype_name)[0].tokens_per_image) + text_tokens  # make_sample's
        timings.append(P.measure_block(cfg, dev, seq, dtype_name, micro_batch=batch))
        _trim_heap()
    phase = _Phases(dev.type == "cpu", rss_before)
    phases, seconds = phase.peaks, phase.seconds
    vlm, build_s = _build(cfg, dev, phase)
    trainable = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
    parts = dtypes.describe_parts(vlm)

    prompt, ids, labels, pixels = _sample_tensors(vlm, text_tokens, batch, dev)
    groups, opt = _optimizer(vlm, cfg, dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=base == torch.bfloat16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    vlm.train()
    vlm.prepare_attention(torch.bfloat16 if base == torch.bfloat16 else None)  # as the trainer: before step 1
    inputs = {"input_ids": ids, "labels": labels, "pixel_values": pixels, "image_counts": [1] * batch}
    for _ in range(steps):  # the last step is timed (on a GPU the first one pays for warm-up)
        loss, step_s, step_cpu_s = _step(vlm, groups, opt, autocast, inputs, cfg.max_grad_norm, sync, phase)
    step_peak = _step_peak(dev, rss_before, phases)
    # The MFU the plan assumes: one block of this LM timed on this device before and after the step, so that
    # a machine shared with other jobs is measured under about the load the step ran under.
    if not mfu:
        assert seq == ids.shape[1], (seq, ids.shape)
        timings.append(P.measure_block(cfg, dev, seq, dtype_name, micro_batch=batch))
    timing = P.mean_timing(timings) if timings else None

    answer, answer_s = _answer(vlm, prompt, pixels, new_tokens, autocast, sync, dev)
    phase("answer", answer_s)

    pred = P.predict_on_device(cfg, dev.type, dtype_name, seq=int(ids.shape[1]), images=1,
                               targets=int(count_targets(labels[:1])), micro_batch=batch, mfu=mfu, timing=timing)
    plan = pred.plan
    step_flops = plan.flops["total"] * batch
    measured_mem = step_peak - rss_before if dev.type == "cpu" else step_peak
    tmp.cleanup()
    return {
        "device": str(dev), "dtype": str(base).replace("torch.", ""), "decision": decision.reason,
        "parts": parts, "tokens": int(ids.shape[1]), "image_tokens": int(vlm.tokens_per_image), "batch": batch,
        "lm_name": Path(lm_file).stem.replace("--", "/"), "tokens_per_s": batch * int(ids.shape[1]) / step_s,
        "loss": loss, "answer": answer, "build_s": build_s, "step_s": step_s, "answer_s": answer_s,
        "step_cpu_s": step_cpu_s, "threads": torch.get_num_threads(), "load": _loadavg(),
        "trainable": trainable, "plan_trainable": plan.trainable, "rss_before": rss_before,
        "peak": step_peak, "peak_rss_total": (rss_before + max(phases.values()) if phases else peak_rss_bytes())
        if dev.type == "cpu" else None, "seconds": seconds, "phases": phases,
        "measured_mem": measured_mem, "plan_mem": pred.memory_bytes, "plan_step_s": pred.step_seconds,
        "plan_states": plan.engines["DDP"], "plan_act": plan.activation_per_gpu(),
        "step_tflop": step_flops / 1e12, "peak_tflops": pred.peak_flops / 1e12, "mfu_assumed": pred.mfu,
        "mfu_source": pred.mfu_source, "timing": timing,
        "achieved_mfu": step_flops / step_s / pred.peak_flops, "plan": plan, "lora_r": lora_r,
        "targets": cfg.lora.targets, "lr": cfg.learning_rate, "projector_lr": cfg.projector_lr,
    }


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _line(name: str, measured: float, predicted: float, unit: str) -> str:
    ratio = measured / predicted if predicted else float("nan")
    ok = "within 25%" if abs(ratio - 1) <= TOLERANCE else "OUTSIDE 25%"
    return f"{name:<22} measured={measured:,.2f} {unit}  plan={predicted:,.2f} {unit}  ratio={ratio:.2f}  {ok}"


def report(r: dict, new_tokens: int) -> str:
    gib = 2**30
    out = [
        f"smoke_real: {r['lm_name']} config + SigLIP so400m/14-384 shape, random weights, device {r['device']}",
        f"dtype: {r['dtype']} ({r['decision']})",
        f"batch: {r['batch']} x {r['tokens']} tokens ({r['image_tokens']} image tokens each); LoRA r{r['lora_r']} on {r['targets']}, "
        f"lr {r['lr']:.1e}, projector lr {r['projector_lr']:.1e}; gradient checkpointing on",
        "parameter dtypes and bytes per part:",
        r["parts"],
        f"build_s                {r['build_s']:.1f}",
        f"loss                   {r['loss']:.4f}",
        f"answer                 {r['answer']} ({len(r['answer'])} tokens greedy, {r['answer_s']:.1f} s)",
        f"trainable_params       measured={r['trainable']:,}  plan={r['plan_trainable']:,}  "
        f"{'equal' if r['trainable'] == r['plan_trainable'] else 'DIFFERENT'}",
    ]
    st = r["plan_states"]
    plan_parts = (f"weights {st['weights'] / gib:.2f} + autocast copies {st['casts'] / gib:.2f} + grads "
                  f"{st['grads'] / gib:.2f} + AdamW {st['optimizer'] / gib:.2f} + activations {r['plan_act'] / gib:.2f}")
    if r["device"].startswith("cpu"):
        out.append(_line("memory (RSS growth)", r["measured_mem"] / gib, r["plan_mem"] / gib, "GiB"))
        out.append(f"  plan: {plan_parts} GiB")
        if r["phases"]:
            out.append("  peak RSS growth per phase: " + ", ".join(f"{k} {v / gib:.2f}" for k, v in r["phases"].items()
                                                                  if k != "answer") + " GiB")
        out.append(f"peak_rss               {r['peak_rss_total'] / gib:.2f} GiB (of which {r['rss_before'] / gib:.2f} GiB "
                   f"before the model: interpreter and libraries)")
    else:
        out.append(_line("memory (max allocated)", r["measured_mem"] / gib, r["plan_mem"] / gib, "GiB"))
        out.append(f"  plan: {plan_parts} GiB")
    out.append(_line("step_s", r["step_s"], r["plan_step_s"], "s"))
    out.append("  of which " + ", ".join(f"{k} {r['seconds'][k]:.1f} s" for k in ("forward", "backward", "optimizer")))
    out.append(f"tokens_per_s           {r['tokens_per_s']:,.0f}")
    t = r["timing"]
    if t is not None and r["device"].startswith("cpu") and t.cpu_seconds > 0:
        # CPU time is what a loaded machine does not stretch: the block's CPU-time rate predicts the step's.
        out.append(_line("step_cpu_s", r["step_cpu_s"], t.cpu_seconds * r["step_tflop"] * 1e12 / t.flops, "s"))
    out.append(f"step_flops             {r['step_tflop']:.2f} TFLOP (plan, recompute included); matmul peak here "
               f"{r['peak_tflops'] * 1e3:.1f} GFLOP/s in {r['dtype']}; plan assumes MFU {r['mfu_assumed']:.2f} "
               f"({r['mfu_source']}), achieved {r['achieved_mfu']:.2f}")
    if r["load"] is not None:
        out.append(f"load average           {r['load']:.1f} ({r['threads']} torch threads)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, the same code path (tests)")
    ap.add_argument("--lm-config", type=Path, default=None,
                    help="a published LM config.json instead of Qwen-1.8B-Chat's (e.g. configs/hub/Qwen--Qwen2.5-1.5B-Instruct.json)")
    ap.add_argument("--steps", type=int, default=1, help="training steps; the last one is timed")
    ap.add_argument("--batch", type=int, default=1, help="samples per step (the same sample repeated)")
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--text-tokens", type=int, default=64, help="text tokens of the sample (besides the image)")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--mfu", type=float, default=None,
                    help="MFU the plan's step time assumes (default: measured on one LM block of the run, on this "
                         "device and dtype, right after the step)")
    args = ap.parse_args(argv)
    r = run(args.device, args.dtype, args.tiny, args.lora_r, args.text_tokens, args.new_tokens, args.mfu,
            args.lm_config, args.steps, args.batch)
    print(report(r, args.new_tokens), flush=True)
    ok = bool(torch.isfinite(torch.tensor(r["loss"]))) and len(r["answer"]) == args.new_tokens
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
