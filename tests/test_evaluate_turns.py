"""trainer.evaluate on multi-turn data: every assistant turn is scored, later turns are answered with the
reference history (the earlier turns' reference answers, never the model's own), and they count in a
`multi-turn` row of their own; `--last-turn-only` keeps the one-row-per-sample behaviour."""

import json

import pytest
import torch
from qwenvl_lab.dataprocess.make_shapes import make_shapes
from qwenvl_lab.dataset.images import load_image
from qwenvl_lab.trainer import evaluate as ev

from tests.tiny_model import build_tiny_vlm, randomize_

THREE_TURNS = {
    "id": "d1", "type": "shape", "images": ["a.png"],
    "messages": [
        {"role": "user", "content": "<image>\nWhat shape is this?"}, {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Is it a square?"}, {"role": "assistant", "content": "no"},
    ],
}


class WrongFirst:
    """Answers 'square' to everything, recording each conversation it was asked."""

    def __init__(self):
        self.asked = []

    def chat_batch(self, convs, **_):
        self.asked += convs
        return ["square" for _ in convs]


@pytest.fixture
def three_turns(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 10)).save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(THREE_TURNS) + "\n" + json.dumps({**THREE_TURNS, "id": "d2", "type": "colour",
                                                              "messages": THREE_TURNS["messages"][:2]}) + "\n")
    return path


def test_each_turn_is_answered_with_the_reference_history(three_turns, tmp_path):
    pairs = ev.load_samples(str(three_turns), str(tmp_path))
    fake = WrongFirst()
    out = tmp_path / "rows.jsonl"
    assert ev.write_answers(fake, pairs, str(out), batch_size=2, every_turn=True) == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["turn"], r["reference"]) for r in rows] == [
        ("d1", 0, "circle"), ("d1", 1, "red"), ("d1", 2, "no"), ("d2", 0, "circle")]
    prompts = [msgs for _, msgs in fake.asked]
    # the model said "square" to the first question, but the history it sees holds the reference "circle"
    assert [m["content"] for m in prompts[2]] == ["<image>\nWhat shape is this?", "circle", "What colour is it?",
                                                  "red", "Is it a square?"]
    assert all(len(images) == 1 for images, _ in fake.asked)  # the image stays with every later turn
    scores = ev.score(rows)
    # turn 0 of d1 is a shape question; d1's later turns count as multi-turn, d2 (one turn) as colour
    assert scores == {"shape": (0, 1), "colour": (0, 1), ev.FOLLOWUP_ROW: (0, 2), "all": (0, 4)}
    rows[2]["answer"] = "No."  # exact match after normalisation
    assert ev.score(rows)[ev.FOLLOWUP_ROW] == (1, 2)
    assert ev.FOLLOWUP_ROW in ev.format_table(ev.score(rows))


def test_last_turn_only_keeps_one_row_per_sample(three_turns, tmp_path):
    pairs = ev.load_samples(str(three_turns), str(tmp_path))
    fake = WrongFirst()
    out = tmp_path / "rows.jsonl"
    assert ev.write_answers(fake, pairs, str(out)) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["reference"]) for r in rows] == [("d1", "no"), ("d2", "circle")]
    assert all("turn" not in r for r in rows) and ev.FOLLOWUP_ROW not in ev.score(rows)


def test_split_turns_of_an_open_conversation():
    from qwenvl_lab.dataset.sample import Sample

    s = Sample(id="o", messages=THREE_TURNS["messages"][:3], images=["a.png"])
    items = ev.split_turns([({}, s)])
    assert [(len(x.messages), t) for _, x, t in items] == [(2, 0), (3, 1)]  # the open last turn: no reference
    assert ev._prompt_and_reference(items[1][1])[1] is None


def test_cli_on_shapes_dialogs_with_a_tiny_model(tmp_path, capsys):
    """The command line on shapes data with follow-ups: one row per turn, the multi-turn row counts exactly the
    follow-up turns, and a follow-up's answer is the model's reply to the reference-history conversation."""
    torch.manual_seed(0)
    vlm = build_tiny_vlm(tmp_path)
    randomize_(vlm, seed=1)
    vlm.save_pretrained(tmp_path / "model")
    data = tmp_path / "shapes"
    make_shapes(data, n_train=0, n_val=10, seed=0, size=32, followups=0.6)
    recs = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines()]
    n_followups = sum(len(r["messages"]) // 2 - 1 for r in recs)
    assert n_followups > 0
    out = tmp_path / "answers.jsonl"
    assert ev.main(["--model", str(tmp_path / "model"), "--data", str(data / "val.jsonl"), "--image-folder",
                    str(data), "--output", str(out), "--batch-size", "3", "--max-new-tokens", "3"]) == 0
    table = capsys.readouterr().out
    line = next(t for t in table.splitlines() if t.startswith(ev.FOLLOWUP_ROW))
    assert int(line.split()[2]) == n_followups
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len(recs) + n_followups
    rec = next(r for r in recs if len(r["messages"]) > 2)
    row = next(r for r in rows if r["id"] == rec["id"] and r["turn"] == 1)
    model = vlm.eval()
    images = [load_image(str(data / p)) for p in rec["images"]]
    assert row["answer"] == model.chat(images, rec["messages"][:3], max_new_tokens=3)
    assert row["reference"] == rec["messages"][3]["content"]
