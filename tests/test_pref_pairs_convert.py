"""dataprocess/make_pref_pairs.py: shapes samples -> preference pairs in trl's layout, read unmodified by
dataset/pref_formats.py: chosen = the sample's answer, rejected = another answer of the same question type,
the same file for the same arguments, `--types` keeps those types, a wrong input is one line."""

from __future__ import annotations

import json

import pytest
from qwenvl_lab.core.cli import run_cli
from qwenvl_lab.dataprocess import make_pref_pairs as mpp
from qwenvl_lab.dataprocess.make_shapes import make_shapes
from qwenvl_lab.dataset.pref_formats import read_pairs

VOCAB = {"colour": {"red", "green", "blue", "yellow"}, "shape": {"circle", "square", "triangle", "cross"},
         "count": {"1", "2", "3", "4"}, "position": {"left", "right"}, "multi": {"first", "second"}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, n_train=30, n_val=5, seed=0, size=32, followups=0.5)
    return root


def test_pairs_are_the_right_answer_against_another_of_the_same_type(shapes, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert run_cli(mpp.main, [str(shapes / "train.jsonl"), "--out", str(out)]) == 0
    samples = {r["id"]: r for r in map(json.loads, (shapes / "train.jsonl").read_text().splitlines())}
    pairs, skipped = read_pairs(str(out), image_folder=str(shapes))
    assert skipped == [] and len(pairs) == len(samples) == 30
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    rejected_seen = set()
    for p in pairs:
        s = samples[p.id]
        assert p.layout == "trl"
        assert p.prompt == [{"role": "user", "content": s["messages"][0]["content"]}]  # the first question only
        assert p.chosen == s["messages"][1]["content"]
        assert p.rejected != p.chosen and p.rejected in VOCAB[s["type"]], (p.rejected, s["type"])
        assert len(p.images) == s["messages"][0]["content"].count("<image>") and p.images[0].endswith(s["images"][0])
        assert rows[p.id]["type"] == s["type"]
        rejected_seen.add((s["type"], p.rejected))
    assert len({r for t, r in rejected_seen if t == "colour"}) > 1  # drawn, not always the same wrong answer
    again = tmp_path / "again.jsonl"
    assert run_cli(mpp.main, [str(shapes / "train.jsonl"), "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_types_filter_and_one_line_errors(shapes, tmp_path, capsys):
    out = tmp_path / "cc.jsonl"
    rep = mpp.make_pref_pairs(shapes / "train.jsonl", out, types={"colour", "count"})
    assert set(rep["by_type"]) == {"colour", "count"} and rep["pairs"] == sum(rep["by_type"].values()) > 0
    assert {json.loads(x)["type"] for x in out.read_text().splitlines()} == {"colour", "count"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for argv, words in (([str(tmp_path / "missing.jsonl")], "no such file"), ([str(bad)], "not a make_shapes sample")):
        assert run_cli(mpp.main, argv + ["--out", str(tmp_path / "o.jsonl")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
