"""Benchmarks' --quick modes run and print their figures; the MFU FLOP count matches a hand count.

No timing is asserted: figures only have to exist and be positive. Correctness checks that do not depend
on speed are asserted (both sides of a benchmark start from the same weights, so the same loss / the
same greedy tokens).
"""

from __future__ import annotations

import re

import pytest
import torch

NUM = r"([-+0-9.eE]+|nan|inf)"


def _figures(out: str, name: str) -> dict[str, float]:
    m = re.search(rf"^{name}\s+ours={NUM} reference={NUM} ratio={NUM}", out, re.M)
    assert m, f"no '{name} ours=.. reference=.. ratio=..' line in:\n{out}"
    return {"ours": float(m.group(1)), "reference": float(m.group(2)), "ratio": float(m.group(3))}


def _sup_figures(out: str, name: str, side: str = "ours") -> dict[str, float]:
    m = re.search(rf"^{name}\s+{side}={NUM} reference_sup={NUM} ratio={NUM}", out, re.M)
    assert m, f"no '{name} {side}=.. reference_sup=.. ratio=..' line in:\n{out}"
    return {"ours": float(m.group(1)), "reference_sup": float(m.group(2)), "ratio": float(m.group(3))}


def test_train_step_quick(capsys):
    from benchmarks import train_step

    res = train_step.main(["--quick", "--levers", "copies"])
    out = capsys.readouterr().out
    for name in ("samples_per_s", "target_tokens_per_s", "peak_mb", "step_s", "cpu_s", "mfu"):
        f = _sup_figures(out, name)
        assert f["ours"] > 0 and f["reference_sup"] > 0 and f["ratio"] > 0, (name, f)
    assert re.search(rf"^samples_per_s\s.* reference={NUM} ratio_ref={NUM}", out, re.M), out
    # Same weights and the same first batch: every side agrees on the loss (padded, supervised-only,
    # full logits, packed, and ours without the copy savings).
    first = res["first_loss"]
    assert set(first) == {"ours", "reference_sup", "reference", "packed", "copies"}, first
    for loss in first.values():
        assert abs(loss - first["reference_sup"]) < 1e-4 * max(1.0, abs(loss)), first
    f = _sup_figures(out, "packed_samples_per_s", "packed")
    assert f["ours"] > 0 and f["reference_sup"] > 0, f
    assert re.search(rf"^copies_step_s\s+copies={NUM} reference_sup={NUM} ratio={NUM} ours={NUM}", out, re.M)
    # The profile splits the elementwise time and compares it.
    assert "the \"other\" (elementwise) time by part" in out
    assert re.search(rf"^other_s \(elementwise\) ours={NUM} reference_sup={NUM}", out, re.M), out
    assert res["profile"]["ours"]["matmul"] > 0
    # bf16: measured where native, otherwise one line saying why.
    from qwenvl_lab.model.dtypes import cpu_native_bf16

    if not cpu_native_bf16()[0]:
        assert re.search(r"^bf16: skipped: no native bf16 matmul on this CPU: the CPU has neither AMX nor "
                         r"AVX512-BF16", out, re.M), out
    else:
        assert "bf16" in res and "bf16: skipped" not in out, out
    s1 = res["stage1"]
    assert s1["cached"]["samples_per_s"] > 0 and s1["pixels"]["samples_per_s"] > 0 and 0 < s1["tower_flop_share"] < 1
    assert re.search(rf"^stage1_samples_per_s\s+cached={NUM} pixels={NUM} ratio={NUM} .*flop_bound={NUM} "
                     rf"of_bound={NUM}", out, re.M), out


def test_train_step_flags_skip_cleanly(capsys):
    """--no-stage1 --no-memory (a KeyError once) and the other skips still print the throughput lines."""
    from benchmarks import train_step

    res = train_step.main(["--quick", "--no-stage1", "--no-memory", "--no-profile", "--no-packing",
                           "--no-reference", "--no-bf16", "--steps", "1"])
    out = capsys.readouterr().out
    assert _sup_figures(out, "samples_per_s")["ratio"] > 0
    assert "peak_mb" not in out and "stage1" not in res and "profile" not in res


def test_generate_quick(capsys):
    from benchmarks import generate

    res = generate.main(["--quick"])
    out = capsys.readouterr().out
    for name in ("tokens_per_s", "prefill_s", "decode_tokens_per_s"):
        f = _figures(out, name)
        assert f["ours"] > 0 and f["reference"] > 0, (name, f)
    # Greedy decoding of the same weights: the generated tokens agree (a tie could flip one row at most).
    assert res["match"] >= 2 / 3, res["match"]


def test_data_quick(capsys):
    from benchmarks import data

    res = data.main(["--quick", "--workers", "0", "2"])
    out = capsys.readouterr().out
    for w in (0, 2):
        m = re.search(rf"^workers={w}\s+samples_per_s={NUM} ratio_to_train={NUM}", out, re.M)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
    assert re.search(rf"^train_samples_per_s\s+{NUM}", out, re.M) and res["train_samples_per_s"] > 0


def test_data_quick_anyres(capsys):
    """--anyres: the pipeline and the training probe with LLaVA-NeXT tiles; the per-image token line is
    the rule's count for the JPEG size."""
    from qwenvl_lab.visual.resolution import Resolution

    from benchmarks import data

    res = data.main(["--quick", "--workers", "0", "--anyres", "2"])
    out = capsys.readouterr().out
    w, h = map(int, re.search(r"jpeg=(\d+)x(\d+)", out).groups())
    spec = data.common.SPECS["quick"]
    rule = Resolution(mode="anyres", image_size=spec.image_size, grid=(spec.image_size // spec.patch_size,) * 2,
                      tokens_per_crop=spec.tokens_per_image, pinpoints=tuple(map(tuple, data.pinpoints(spec.image_size, 2))))
    want = rule.layout(w, h).tokens
    assert f"min {want} median {want} max {want}" in out and want > spec.tokens_per_image, out
    assert res["train_samples_per_s"] > 0 and res["pipeline"][0] > 0


# ----- MFU -------------------------------------------------------------------------------------------
def _tiny_vlm(tmp_path, **over):
    from qwenvl_lab.model import build_vlm

    from tests.tiny_visual import save_tiny_clip

    tower = save_tiny_clip(tmp_path / "clip", image_size=32, patch_size=8, hidden=32, layers=2)
    lm_config = {"arch": "qwen2", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
                 "max_position_embeddings": 128, "tie_word_embeddings": False}
    cfg = {"lm": "scratch", "lm_backend": "qwen", "lm_config": lm_config, "image_token_id": 100,
           "towers": [{"backend": "hf_clip", "name_or_path": str(tower), "feature_layer": -2,
                       "select": "patch"}], "image_mode": "resize", "projector": "mlp2x_gelu", **over}
    return build_vlm(cfg)


def _batch(vlm):
    """2 samples: lengths 20 (one image) and 12 (padded), 7 supervised positions after the shift."""
    T = 20
    ids = torch.randint(0, 90, (2, T))
    ids[0, 2:2 + 16] = vlm.image_token_id  # tokens_per_image = 16
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 12:] = 0
    labels = torch.full((2, T), -100)
    labels[0, 18:20] = 5  # 2 targets
    labels[1, 6:11] = 7  # 5 targets
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(1, 3, 32, 32), "image_counts": torch.tensor([1, 0])}


def _hand_count(tower_trains: bool, proj_trains: bool, lm_trains: bool) -> int:
    # CLIP tower: d=32, 2 layers, MLP 64, patch 8 on 32 px -> 16 patches + CLS = 17 positions.
    d, layers, mlp, t = 32, 2, 64, 17
    tower_w = layers * (4 * d * d + 2 * d * mlp) + 3 * 8 * 8 * d
    tower = (6 if tower_trains else 2) * tower_w * t + (12 if tower_trains else 4) * layers * d * t * t
    # projector mlp2x_gelu 32 -> 32 -> 32 on 16 tokens.
    proj = (6 if proj_trains else 2) * (32 * 32 + 32 * 32) * 16
    # LM: H=32, 4 heads x 8, 2 KV heads, MLP 48, 2 layers; c_attn (4+2+2)*8 rows; head 128 x 32.
    H = 32
    per_layer = (8 * 8) * H + H * H + 3 * 48 * H
    flows = tower_trains or proj_trains or lm_trains
    m_lm = 2 + 2 * flows + 2 * lm_trains
    lm = m_lm * 2 * per_layer * (20 + 12)
    attn = (12 if flows else 4) * 2 * (4 * 8) * (20 * 20 + 12 * 12)
    head = m_lm * 128 * H * 7
    return tower + proj + lm + attn + head


@pytest.mark.parametrize("stage", ["full", "stage1"])
def test_step_flops_hand_count(tmp_path, stage):
    from qwenvl_lab.model.flops import ModelDims, batch_stats, step_flops

    vlm = _tiny_vlm(tmp_path)  # towers frozen (default)
    if stage == "stage1":
        vlm.lm.requires_grad_(False)  # only the projector trains
    dims = ModelDims.from_model(vlm)
    stats = batch_stats(_batch(vlm))
    assert (stats.tokens, stats.targets, stats.images, stats.samples) == (32, 7, 1, 2)
    flops = step_flops(dims, stats)
    assert flops["total"] == _hand_count(False, True, stage == "full")
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")


def test_step_flops_cached_features_skip_tower(tmp_path):
    from qwenvl_lab.model.flops import ModelDims, batch_stats, step_flops

    vlm = _tiny_vlm(tmp_path)
    batch = _batch(vlm)
    pix = batch.pop("pixel_values")
    batch["image_features"] = vlm.towers(pix)  # [1, 16, 32]
    flops = step_flops(ModelDims.from_model(vlm), batch_stats(batch))
    assert flops["towers"] == 0 and flops["projector"] == 6 * 2048 * 16


def test_peak_matmul_flops_cached():
    from qwenvl_lab.model.flops import _PEAK_CACHE, peak_matmul_flops

    _PEAK_CACHE.pop(("cpu", str(torch.float64)), None)
    rng = torch.get_rng_state()
    a = peak_matmul_flops("cpu", torch.float64, size=64, repeats=1)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is untouched
    assert a > 0 and peak_matmul_flops("cpu", torch.float64) == a  # measured once per device/dtype


def test_measure_matmul_peak_gives_wall_and_cpu_rates():
    from qwenvl_lab.model.flops import measure_matmul_peak

    rng = torch.get_rng_state()
    wall, cpu = measure_matmul_peak("cpu", torch.float64, sizes=(32, 64), repeats=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert wall > 0 and cpu > 0


def test_throughput_callback_logs(tmp_path):
    from qwenvl_lab.dataset import Collator
    from qwenvl_lab.trainer.hf_trainer import VLMTrainer
    from qwenvl_lab.trainer.throughput import ThroughputCallback
    from transformers import TrainingArguments

    vlm = _tiny_vlm(tmp_path)
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(6):
        n = 20 + 2 * i
        ids = torch.randint(0, 90, (n,), generator=g)
        labels = torch.full((n,), -100)
        labels[-3:] = ids[-3:]
        pix = None
        if i % 2 == 0:
            ids[1:17] = vlm.image_token_id
            pix = torch.randn(1, 3, 32, 32, generator=g)
        items.append({"input_ids": ids, "labels": labels, "pixel_values": pix, "n_images": int(pix is not None),
                      "id": str(i), "skipped": []})
    cb = ThroughputCallback(vlm, peak_flops=1e9)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=3,
                             logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = VLMTrainer(model=vlm, args=args, train_dataset=items, data_collator=Collator(pad_id=0),
                         callbacks=[cb], lr_settings=dict(learning_rate=1e-3, projector_lr=None, vision_lr=None))
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 3
    for r in rows:
        for key in ("tokens_per_s", "target_tokens_per_s", "samples_per_s", "tflops", "mfu", "peak_mem_gb"):
            assert r[key] > 0, (key, r)
        assert 0 <= r["data_wait_frac"] <= 1
    # One epoch of 6 items in 3 steps: the hook counted every real token, target and image exactly once.
    assert cb.totals["tokens"] == sum(len(it["input_ids"]) for it in items)
    assert cb.totals["targets"] == 3 * len(items)
    assert cb.totals["images"] == 3


def test_train_run_logs_throughput(tmp_path):
    """trainer/run.py wires the callback: every training log line in log.jsonl carries the figures."""
    from qwenvl_lab.trainer.callbacks import read_log
    from qwenvl_lab.trainer.run import train

    from tests.tiny_train import make_tiny_data, tiny_train_config

    data = make_tiny_data(tmp_path / "shapes", n_train=16, n_val=2)
    out = train(tiny_train_config(tmp_path, data, max_steps=2)).output_dir
    rows = [r for r in read_log(out / "log.jsonl") if "loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["mfu"] > 0 and r["tokens_per_s"] > 0 and r["images_per_s"] > 0 and r["peak_mem_gb"] > 0, r
        assert 0 <= r["data_wait_frac"] <= 1, r


def test_batch_counts_stop_targets_at_packed_boundaries():
    from benchmarks.common import batch_counts

    labels = torch.tensor([[5, 6, 7, 8, 9, -100]])
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels), "labels": labels}
    assert batch_counts(batch)["targets"] == 4
    # Two packed sequences of 3: the last token of the first has no target across the boundary.
    packed = dict(batch, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    assert batch_counts(packed)["targets"] == 3


def test_peak_step_bytes_follows_allocations_in_time_order():
    """The CPU peak is the running sum of timed allocation records: a tensor freed inside an op (here
    inside a custom function that allocates a temporary, then frees it) still counts while alive."""
    from benchmarks import common

    mb = 1 << 20

    def temporaries():
        a = torch.empty(4 * mb, dtype=torch.uint8)  # 4 MiB, alive until the end
        b = torch.empty(8 * mb, dtype=torch.uint8)  # + 8 MiB: peak 12 MiB
        del b
        c = torch.empty(2 * mb, dtype=torch.uint8)  # 6 MiB now
        return a, c

    peak = common.peak_step_bytes(temporaries, torch.device("cpu"))
    assert 12 * mb <= peak < 13 * mb
    logits, y = torch.randn(1000, 1000), torch.zeros(1000, dtype=torch.long)
    inner = common.peak_step_bytes(lambda: torch.nn.functional.cross_entropy(logits, y), torch.device("cpu"))
    assert inner >= 4_000_000  # the log-softmax made and freed inside cross_entropy (an op start-order sum: ~0)


def test_screen_head_quick(capsys):
    """Every screen this torch build has is timed at 1 row and at a batch, and gives the fp32 screen's tokens."""
    from benchmarks import screen_head

    res = screen_head.main(["--quick"])
    out = capsys.readouterr().out
    _check_screens(res, out)
    res = screen_head.main(["--quick", "--from-model"])  # the tiny benchmark VLM's head and decode states
    out = capsys.readouterr().out
    assert "hidden_states=model" in out and "vocab=512 hidden=64 " in out, out  # common.SPECS["quick"]
    _check_screens(res, out)


def _check_screens(res: dict, out: str) -> None:
    from qwenvl_lab.qwen.generation import ScreenedHead

    names = [n for n in ScreenedHead.SCREENS if ScreenedHead.supported(n)]
    for name in names:
        for rows in (1, 8):
            f = res[(name, rows)]
            assert f["same"] and f["ms"] > 0 and f["candidates"] >= 1, (name, rows, f)
            assert re.search(rf"^screen={name}\s+rows={rows}\s+ms=\s*{NUM} candidates_per_row=\s*{NUM} "
                             r"same_as_fp32=True$", out, re.M), out
    assert res["chosen"]["small"] in ScreenedHead.available() and res["chosen"]["large"] in ScreenedHead.available()
