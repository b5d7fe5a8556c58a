"""`make smoke-real`'s code path at tiny shapes: the recipe's trainable set, one step, a 4-token answer,
and the plan's trainable count and memory prediction printed beside the measurements."""

import os
import re

import torch


def test_smoke_real_tiny_runs_the_real_code_path(capsys):
    from benchmarks import smoke_real

    assert smoke_real.main(["--tiny", "--device", "cpu", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"trainable_params\s+measured=([\d,]+)\s+plan=([\d,]+)\s+equal", out)
    assert m and int(m.group(1).replace(",", "")) > 0
    assert re.search(r"answer\s+\[[\d, ]+\] \(4 tokens greedy", out)
    for name in ("memory \\(RSS growth\\)", "step_s", "step_cpu_s"):
        assert re.search(rf"{name}\s+measured=[\d.,]+ \S+\s+plan=[\d.,]+ \S+\s+ratio=[\d.]+", out), name
    # the MFU comes from this machine (one LM block timed), not a constant; the plan's memory terms are shown
    assert re.search(r"plan assumes MFU [\d.]+ \(measured on one LM block", out)
    assert re.search(r"plan: weights [\d.]+ \+ autocast copies 0\.00 \+ grads", out)  # fp32: no casts
    if os.access("/proc/self/clear_refs", os.W_OK):  # Linux: each phase's peak is its own
        assert re.search(r"peak RSS growth per phase: build [\d.]+, forward [\d.]+, backward [\d.]+, optimizer", out)
    assert "LoRA r8 on c_attn|w1|w2" in out and "projector lr 1.0e-04" in out  # the recipe's settings


def test_smoke_sample_layout():
    from benchmarks.smoke_real import make_sample

    prompt, ids, labels = make_sample(729, 64, 8, 151646, 151936)
    assert ids.shape == (1, 729 + 64) and (ids == 151646).sum() == 729
    assert ids[0, : len(prompt)].tolist() == prompt
    supervised = labels[0] != -100
    assert int(supervised.sum()) == 9 and bool(torch.equal(ids[0][supervised][-1:], torch.tensor([151645])))
