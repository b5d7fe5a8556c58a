"""benchmarks/dpo_step.py --quick runs and prints both sides' lines (ours and trl's DPOTrainer).

No timing is asserted: the figures only have to exist and be positive. What does not depend on speed is
asserted: both sides start from the same saved LLaVA weights and the same pair rows, so the first step's loss
is ln 2 on both (policy == reference) and the mean chosen log-prob of ours equals trl's own `logps/chosen`.
"""

from __future__ import annotations

import math
import re

NUM = r"([-+0-9.eE]+|nan|inf)"


def _line(out: str, name: str, a: str, b: str) -> tuple[float, float, float]:
    m = re.search(rf"^{name}\s+{a}={NUM} {b}={NUM} ratio={NUM}", out, re.M)
    assert m, f"no '{name} {a}=.. {b}=.. ratio=..' line in:\n{out}"
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def test_dpo_step_quick_prints_both_sides(capsys):
    from benchmarks import dpo_step

    res = dpo_step.main(["--quick", "--steps", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    for name in ("dpo_step_s", "dpo_cpu_s", "dpo_peak_mb"):
        ours, trl, ratio = _line(out, name, "ours", "trl")
        assert ours > 0 and trl > 0 and ratio > 0, (name, out)
    dpo, sft, ratio = _line(out, "pairs_vs_sft_peak_mb", "dpo", "sft")
    assert dpo > 0 and sft > 0 and ratio > 0, out
    assert re.search(rf"^dpo_steps_per_s\s+ours={NUM} trl={NUM} speedup={NUM}", out, re.M), out
    assert abs(res["ours_loss_first"] - math.log(2)) < 1e-6, res
    assert abs(res["trl_loss_first"] - math.log(2)) < 1e-6, res
    ours, trl = res["ours_logps_chosen_first"], res["trl_logps_chosen_first"]
    assert abs(ours - trl) < 1e-4 * max(1.0, abs(trl)), (ours, trl)
