"""Shared parts of the benchmarks: the benchmark model pair, the synthetic LLaVA-like mix, memory probes.

Contract:
- `SPECS`: `"full"` (the benchmark shape: CLIP-like 224 px / patch 16 tower -> 196 tokens, hidden 384,
  4 layers; a 4-layer 512-wide Qwen2 LM, 8 heads / 2 KV heads, the real 151,936-row vocabulary, tied
  embeddings as the small Qwen2 models), `"quick"` (a tiny version for tests), and the stage-1 shapes
  `"stage1"` (LLaVA-1.5's pretraining scaled down: a CLIP-L/336-like tower, 336 px / patch 14 -> 576
  tokens, 12 layers of 384, in front of the same LM, captions of 8-32 tokens) and `"stage1_quick"`.
- `make_plain_mix(spec, n, seed)`: stage-1 items (one image, a caption; plain mode).
- `build_pair(spec, workdir, seed) -> (ours, reference)`: a transformers `LlavaForConditionalGeneration`
  built from `spec` with a fixed seed and written with `save_pretrained`; the reference is that
  directory read back by transformers, ours is the same directory read by `VLM.from_pretrained`
  (model/llava.py), so both hold the SAME weights. Both have the vision tower frozen.
- `make_mix(spec, n, seed) -> list[item]`: synthetic samples in the `VLMDataset` item format
  (multi-turn ChatML with the spec's special ids, 0-3 images, variable lengths, labels only on answers
  and their `<|im_end|>`), with random normalised pixels; `batches(items, batch_size, pad_id)` collates
  them with `dataset.Collator` (right padding, exactly as training).
- `peak_step_bytes(fn, device)`: peak bytes allocated while `fn()` runs, above what was allocated
  before it (CUDA: the caching allocator's peak; CPU: the running sum of every allocation and free the
  torch profiler records, each at its own time); `resident_bytes(model, optimizer)`: parameters,
  gradients and optimizer state currently held; `rss_bytes()` / `peak_rss_bytes()`: the process's resident
  set now / at its peak (CPU memory).
- `set_malloc(mode)`: glibc's allocator on Linux, `"retain"` (freed memory kept for reuse: no page
  faults on the next large tensor; what `train.py` uses on a CPU) or `"default"` (glibc's defaults, freed
  memory handed back to the system); a no-op elsewhere.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never download anything
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the CPU profiler quiet; set before torch loads

import resource

import torch  # noqa: E402
from qwenvl_lab.core.loss import IGNORE_INDEX, count_targets  # noqa: E402  (after the environment above)
from qwenvl_lab.dataset import Collator
from qwenvl_lab.model import VLM
from qwenvl_lab.trainer.cpu_malloc import retain_freed_memory
from torch.profiler import ProfilerActivity, profile
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
from transformers.utils import logging as hf_logging


@dataclass(frozen=True)
class BenchSpec:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_intermediate: int
    vocab_size: int
    n_text: int  # ordinary text ids are drawn from [0, n_text)
    im_start: int
    im_end: int
    image_start: int
    image_end: int
    image_token: int
    eod: int
    turns: tuple[int, int] = (1, 3)  # (min, max) user/assistant pairs per sample
    user_len: tuple[int, int] = (8, 48)
    answer_len: tuple[int, int] = (8, 96)
    image_weights: tuple[float, ...] = (0.15, 0.6, 0.15, 0.1)  # P(0, 1, 2, 3 images)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # CLS dropped ("default" strategy)


SPECS: dict[str, BenchSpec] = {
    # Real Qwen2 ids: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
    # <|vision_start|> 151652, <|vision_end|> 151653, <|image_pad|> 151655.
    "full": BenchSpec(
        image_size=224, patch_size=16, vision_hidden=384, vision_layers=4, vision_heads=6,
        lm_hidden=512, lm_layers=4, lm_heads=8, lm_kv_heads=2, lm_intermediate=2048,
        vocab_size=151936, n_text=151643, im_start=151644, im_end=151645, image_start=151652,
        image_end=151653, image_token=151655, eod=151643,
    ),
    "quick": BenchSpec(
        image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
        lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=128,
        vocab_size=512, n_text=480, im_start=481, im_end=482, image_start=483, image_end=484,
        image_token=485, eod=480, turns=(1, 2), user_len=(2, 8), answer_len=(2, 10),
    ),
    # LLaVA-1.5 stage 1 scaled down: CLIP-L/336's geometry (336 px, patch 14, 576 tokens, read at layer -2)
    # with 12 layers of 384 instead of 24 of 1024; the frozen LM of "full"; BLIP-like short captions.
    "stage1": BenchSpec(
        image_size=336, patch_size=14, vision_hidden=384, vision_layers=12, vision_heads=6,
        lm_hidden=512, lm_layers=4, lm_heads=8, lm_kv_heads=2, lm_intermediate=2048,
        vocab_size=151936, n_text=151643, im_start=151644, im_end=151645, image_start=151652,
        image_end=151653, image_token=151655, eod=151643, answer_len=(8, 32),
    ),
    "stage1_quick": BenchSpec(
        image_size=56, patch_size=14, vision_hidden=32, vision_layers=3, vision_heads=2,
        lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=128,
        vocab_size=512, n_text=480, im_start=481, im_end=482, image_start=483, image_end=484,
        image_token=485, eod=480, answer_len=(2, 10),
    ),
}


def setup_torch(threads: int | None = None) -> None:
    """Quiet torch / transformers; `threads` CPU threads (None or 0: torch's default)."""
    if threads:
        torch.set_num_threads(threads)

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars between the figures


def llava_config(spec: BenchSpec):
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
    )
    text = Qwen2Config(
        vocab_size=spec.vocab_size, hidden_size=spec.lm_hidden, intermediate_size=spec.lm_intermediate,
        num_hidden_layers=spec.lm_layers, num_attention_heads=spec.lm_heads,
        num_key_value_heads=spec.lm_kv_heads, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=spec.eod, eos_token_id=spec.im_end, pad_token_id=spec.eod,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=spec.image_token,
        vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=True,
    )


def save_llava(spec: BenchSpec, path: Path, seed: int = 0) -> Path:
    """A random LlavaForConditionalGeneration (transformers' own init, fixed seed) saved to `path`."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(spec))
    model.save_pretrained(str(path))
    return Path(path)


def load_reference(path: Path):
    ref = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    ref.model.vision_tower.requires_grad_(False)  # same trainable set as ours: projector + LM
    return ref


def load_ours(path: Path):
    return VLM.from_pretrained(path)  # a Llava directory: imported by model/llava.py


def build_pair(spec: BenchSpec, workdir: Path, seed: int = 0):
    """(ours, reference) with identical weights; see the module docstring."""
    path = save_llava(spec, Path(workdir) / "llava", seed)
    ours = load_ours(path)
    ref = load_reference(path)
    assert ours.tokens_per_image == spec.tokens_per_image, (ours.tokens_per_image, spec.tokens_per_image)
    assert ours.image_token_id == spec.image_token, (ours.image_token_id, spec.image_token)
    return ours, ref


# ----- the synthetic mix ------------------------------------------------------------------------------
def _text(rng: random.Random, spec: BenchSpec, span: tuple[int, int]) -> list[int]:
    return [rng.randrange(spec.n_text) for _ in range(rng.randint(*span))]


def render_sample(spec: BenchSpec, rng: random.Random) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, n_images) of one random multi-turn ChatML conversation."""
    n_images = rng.choices(range(len(spec.image_weights)), weights=spec.image_weights)[0]
    n_turns = rng.randint(*spec.turns)
    # Images go into user turns: most in the first, the rest in random turns (LLaVA's interleaving).
    where = sorted([0] + [rng.randrange(n_turns) for _ in range(n_images - 1)]) if n_images else []
    span = [spec.image_start] + [spec.image_token] * spec.tokens_per_image + [spec.image_end]
    newline = spec.n_text - 1  # any ordinary id stands for "\n"
    ids: list[int] = []
    labels: list[int] = []

    def add(tokens: list[int], supervised: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if supervised else [IGNORE_INDEX] * len(tokens))

    for turn in range(n_turns):
        add([spec.im_start, 1, newline], False)  # <|im_start|>user\n
        for _ in range(where.count(turn)):
            add(span + [newline], False)
        add(_text(rng, spec, spec.user_len) + [spec.im_end, newline], False)
        add([spec.im_start, 2, newline], False)  # <|im_start|>assistant\n
        add(_text(rng, spec, spec.answer_len) + [spec.im_end], True)  # answer + <|im_end|> supervised
        add([newline], False)
    return ids, labels, n_images


def render_prompt(spec: BenchSpec, rng: random.Random, n_images: int) -> list[int]:
    """A one-turn ChatML prompt with `n_images` image spans and the `<|im_start|>assistant\\n` header."""
    span = [spec.image_start] + [spec.image_token] * spec.tokens_per_image + [spec.image_end]
    newline = spec.n_text - 1
    ids = [spec.im_start, 1, newline]
    for _ in range(n_images):
        ids += span + [newline]
    return ids + _text(rng, spec, spec.user_len) + [spec.im_end, newline, spec.im_start, 2, newline]


def left_padded_prompts(spec: BenchSpec, n: int, seed: int = 0) -> dict:
    """`n` prompts (1 image each, the last of an odd n has 2) left-padded with `eod`:
    {input_ids [n, T], attention_mask [n, T], pixel_values [n_images, 3, H, W], image_counts [n]}."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    counts = [1] * n
    if n % 2:
        counts[-1] = 2
    seqs = [render_prompt(spec, rng, c) for c in counts]
    T = max(len(s) for s in seqs)
    ids = torch.full((n, T), spec.eod, dtype=torch.long)  # [n, T]
    mask = torch.zeros((n, T), dtype=torch.long)  # [n, T]
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s)
        mask[b, T - len(s):] = 1
    pix = torch.randn(sum(counts), 3, spec.image_size, spec.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix,
            "image_counts": torch.tensor(counts)}


def make_mix(spec: BenchSpec, n: int, seed: int = 0) -> list[dict]:
    """`n` items in the VLMDataset item format (see module docstring)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids, labels, n_images = render_sample(spec, rng)
        pix = (torch.randn(n_images, 3, spec.image_size, spec.image_size, generator=g)
               if n_images else None)  # [n_images, 3, H, W], already "normalised"
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pix,
                      "n_images": n_images, "id": f"mix-{i}", "skipped": []})
    return items


def make_plain_mix(spec: BenchSpec, n: int, seed: int = 0) -> list[dict]:
    """Stage-1 (plain mode) items: one image span, then a caption + `eod`, supervised on the caption."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    span = [spec.image_start] + [spec.image_token] * spec.tokens_per_image + [spec.image_end]
    items = []
    for i in range(n):
        caption = _text(rng, spec, spec.answer_len) + [spec.eod]
        ids = span + caption
        labels = [IGNORE_INDEX] * len(span) + caption
        pix = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)  # [1, 3, H, W]
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pix,
                      "n_images": 1, "id": f"plain-{i}", "skipped": []})
    return items


def batches(items: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    """Consecutive items collated exactly as training does (dataset.Collator, right padding)."""
    collate = Collator(pad_id=pad_id)
    out = []
    for i in range(0, len(items) - batch_size + 1, batch_size):
        out.append(dict(collate(items[i:i + batch_size])))
    assert out, f"{len(items)} items make no batch of {batch_size}"
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def batch_counts(batch: dict) -> dict:
    """samples, real tokens, target tokens (labels after the shift, within each packed sequence) and images of
    a collated batch."""
    return {
        "samples": int(batch["input_ids"].shape[0]),
        "tokens": int(batch["attention_mask"].sum()),
        "targets": int(count_targets(batch["labels"], batch.get("cu_seqlens"))),
        "images": 0 if batch.get("pixel_values") is None else int(batch["pixel_values"].shape[0]),
    }


# ----- timing and memory ------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn() (device work included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rss_bytes() -> int:
    """The process's resident set now (Linux /proc), or 0 where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident set so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_step_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated during fn() above the bytes allocated before it (see module docstring)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation and free the profiler saw, at its own time (not at the start of the op that holds it:
    # an op that allocates and frees inside would otherwise count its free first).
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    cur = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of parameters (each shared tensor once), gradients and optimizer state tensors."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def fmt_mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


_MALLOC_MODE = ["default"]


def set_malloc(mode: str) -> bool:
    """Switch glibc's allocator between `retain` and `default` (see the module docstring); False if not glibc."""
    if mode == _MALLOC_MODE[0]:
        return True
    ok = retain_freed_memory(mode == "retain")
    if ok:
        _MALLOC_MODE[0] = mode
    return ok
