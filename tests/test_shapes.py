"""make_shapes: determinism, splits, answer vocabulary, per-type counts, pictures that match answers, and
the follow-up turns (same images, answers that match the pictures and the earlier turns, trained labels).

The checks on pixels are independent of the generator: colours are recognised by which RGB channels
dominate, shapes by how much of their bounding box they fill, counts by connected components.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from qwenvl_lab.dataprocess import make_shapes
from qwenvl_lab.dataprocess.common import SourceError

# The spec's vocabulary, written out here rather than imported, so a change in the generator shows up.
VOCAB = {
    "colour": {"red", "green", "blue", "yellow"},
    "shape": {"circle", "square", "triangle", "cross"},
    "count": {"1", "2", "3", "4"},
    "position": {"left", "right"},
    "multi": {"first", "second"},
}
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is this?",
    "count": "How many shapes are there?",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img).astype(int)  # [H, W, 3]


def foreground(a: np.ndarray) -> np.ndarray:
    return (a != 255).any(axis=-1)  # [H, W] bool; the background is pure white


def colour_name(rgb) -> str:
    r, g, b = rgb
    if r > 150 and g > 150 and b < 100:
        return "yellow"
    return {0: "red", 1: "green", 2: "blue"}[int(np.argmax(rgb))]


def dominant_colour(a: np.ndarray, mask: np.ndarray) -> str:
    values, counts = np.unique(a[mask], axis=0, return_counts=True)
    return colour_name(values[np.argmax(counts)])


def shape_name(mask: np.ndarray) -> str:
    """Classify one filled shape by the fraction of its bounding box it covers (and its bottom row)."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    fill = box.mean()  # square 1, circle pi/4, cross ~0.58, triangle ~0.5
    bottom = box[-1].mean()  # a triangle sits on a full base, a cross on one thin arm
    if fill > 0.93:
        return "square"
    if fill > 0.7:
        return "circle"
    return "triangle" if bottom > 0.8 else "cross"


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask (a small flood fill; no scipy needed)."""
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return out


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes.make_shapes(out, n_train=200, n_val=50, seed=3, size=64)
    return out


def test_deterministic_byte_identical(tmp_path, shapes_dir):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert make_shapes.main([str(a), "--n-train", "40", "--n-val", "10", "--seed", "7"]) == 0
    assert make_shapes.main([str(b), "--n-train", "40", "--n-val", "10", "--seed", "7"]) == 0
    make_shapes.make_shapes(c, n_train=40, n_val=10, seed=8)
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 50
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    # another seed gives other data
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()


def test_splits_and_schema(shapes_dir):
    train, val = read_jsonl(shapes_dir / "train.jsonl"), read_jsonl(shapes_dir / "val.jsonl")
    assert len(train) == 200 and len(val) == 50
    ids = [s["id"] for s in train + val]
    assert len(set(ids)) == len(ids)
    for split, samples in (("train", train), ("val", val)):
        for s in samples:
            assert set(s) == {"id", "messages", "images", "videos", "type"} and s["videos"] == []
            user, assistant = s["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"].count("<image>") == len(s["images"]) == (2 if s["type"] == "multi" else 1)
            for rel in s["images"]:
                assert rel.startswith(f"images/{split}/") and (shapes_dir / rel).is_file()
    # the splits are drawn from different streams: their first pictures differ
    assert pixels(shapes_dir / train[0]["images"][0]).tolist() != pixels(shapes_dir / val[0]["images"][0]).tolist()
    meta = json.loads((shapes_dir / "meta.json").read_text())
    assert {t: set(v) for t, v in meta["answers"].items()} == VOCAB


def test_answer_vocab_and_type_counts(shapes_dir):
    train = read_jsonl(shapes_dir / "train.jsonl")
    counts = Counter(s["type"] for s in train)
    assert counts == {t: 40 for t in VOCAB}  # 200 samples round-robin over 5 types
    answers_seen = {t: set() for t in VOCAB}
    for s in train:
        answer = s["messages"][1]["content"]
        assert answer in VOCAB[s["type"]] and " " not in answer  # one word: exact match is meaningful
        answers_seen[s["type"]].add(answer)
        if s["type"] in QUESTIONS:
            assert s["messages"][0]["content"].endswith(QUESTIONS[s["type"]])
    # 40 samples per type cover the whole vocabulary (chance of missing one is negligible)
    assert answers_seen == VOCAB


def test_types_option(tmp_path):
    out = tmp_path / "cs"
    assert make_shapes.main([str(out), "--n-train", "7", "--n-val", "0", "--types", "colour,shape"]) == 0
    train = read_jsonl(out / "train.jsonl")
    assert Counter(s["type"] for s in train) == {"colour": 4, "shape": 3}
    assert (out / "val.jsonl").read_text() == ""
    with pytest.raises(ValueError, match="unknown"):
        make_shapes.parse_types("colour,size")


def test_pictures_match_answers(shapes_dir):
    size = 64
    for s in read_jsonl(shapes_dir / "train.jsonl"):
        qtype, answer = s["type"], s["messages"][1]["content"]
        arrays = [pixels(shapes_dir / rel) for rel in s["images"]]
        a = arrays[0]
        mask = foreground(a)
        if qtype in ("colour", "shape"):
            ys, xs = np.nonzero(mask)
            assert xs.max() - xs.min() + 1 >= size / 3 and ys.max() - ys.min() + 1 >= size / 3, s["id"]
            assert len(components(mask)) == 1, s["id"]
            got = dominant_colour(a, mask) if qtype == "colour" else shape_name(mask)
            assert got == answer, s["id"]
        elif qtype == "count":
            assert len(components(mask)) == int(answer), s["id"]
        elif qtype == "position":
            colour, shape = s["messages"][0]["content"].split("Is the ")[1].split(" on the")[0].split()
            target = mask & np.array([[colour_name(p) == colour for p in row] for row in a])
            assert target.any(), s["id"]
            assert shape_name(target) == shape, s["id"]
            xs = np.nonzero(target)[1]
            assert ("left" if xs.mean() < size / 2 else "right") == answer, s["id"]
        else:  # multi
            colour, shape = s["messages"][0]["content"].split("has the ")[1].split("?")[0].split()
            kinds = []
            for arr in arrays:
                m = foreground(arr)
                kinds.append((dominant_colour(arr, m), shape_name(m)))
            matches = [k == (colour, shape) for k in kinds]
            assert matches == [answer == "first", answer == "second"], (s["id"], kinds)


# ------------------------------------------------------------------------------------------- follow-ups
FOLLOWUP_ANSWERS = VOCAB["colour"] | VOCAB["shape"] | VOCAB["position"] | {"yes", "no", "2", "3", "4", "5"}


@pytest.fixture(scope="module")
def dialog_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes_dialog")
    make_shapes.make_shapes(out, n_train=200, n_val=20, seed=3, size=64, followups=1.0)  # every sample
    return out


def qa_pairs(sample: dict) -> list[tuple[str, str]]:
    msgs = sample["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) and len(msgs) % 2 == 0
    return [(msgs[k]["content"], msgs[k + 1]["content"]) for k in range(0, len(msgs), 2)]


def kinds(a: np.ndarray) -> list[tuple[str, str, float]]:
    """(colour, shape, mean x) of each shape in a picture."""
    return [(dominant_colour(a, m), shape_name(m), float(np.nonzero(m)[1].mean())) for m in components(foreground(a))]


def test_followups_keep_the_scene_and_the_first_turn(shapes_dir, dialog_dir):
    """Follow-ups are extra turns about the same pictures: the images and the first question-answer pair are
    byte-for-byte those of the same samples without follow-ups; only the first user turn holds image markers."""
    plain, dialog = read_jsonl(shapes_dir / "train.jsonl"), read_jsonl(dialog_dir / "train.jsonl")
    assert len(plain) == len(dialog) == 200
    turns = Counter()
    for p, d in zip(plain, dialog):
        assert p["id"] == d["id"] and p["type"] == d["type"] and p["images"] == d["images"]
        assert d["messages"][:2] == p["messages"]
        assert all((shapes_dir / rel).read_bytes() == (dialog_dir / rel).read_bytes() for rel in d["images"])
        pairs = qa_pairs(d)
        assert all("<image>" not in q for q, _ in pairs[1:]), d["id"]
        turns[len(pairs)] += 1
        assert all(a in FOLLOWUP_ANSWERS and " " not in a for _, a in pairs[1:]), d["id"]
    assert set(turns) == {2, 3}  # 1-2 follow-ups each (followups=1.0: every sample has some)
    meta = json.loads((dialog_dir / "meta.json").read_text())
    assert meta["followups"] == 1.0


def _check_followup(qtype: str, first: tuple[str, str], prev: tuple[str, str], q: str, a: str,
                    arrays: list[np.ndarray], sid: str) -> None:
    """One follow-up's answer against the pixels and the earlier turns."""
    shapes = kinds(arrays[0])
    if qtype == "multi":
        target = first[0].split("has the ")[1].split("?")[0].split()
        other = [kinds(x)[0] for x in arrays if kinds(x)[0][:2] != tuple(target)]
        assert len(other) == 1 and other[0][:2] != tuple(target), sid
        assert a == (other[0][0] if q.startswith("What colour is the shape in the other image") else other[0][1]), sid
    elif qtype in ("colour", "shape"):
        (colour, shape, _), = shapes
        if q in ("What shape is it?", "What colour is it?"):
            assert a == (shape if "shape" in q else colour), sid
        else:  # "Is it <colour>?" / "Is it a <shape>?"
            asked = q.rstrip("?").split()[-1]
            assert (a == "yes") == (asked in (colour, shape)), sid
    elif qtype == "count":
        if q.startswith("Is there a "):
            asked = q.split()[3]
            assert (a == "yes") == any(c == asked for c, _, _ in shapes), sid
        else:  # one more than the first answer (and than the picture holds)
            assert int(a) == int(first[1]) + 1 == len(shapes) + 1, sid
    else:  # position
        colour, shape = first[0].split("Is the ")[1].split(" on the")[0].split()
        others = [k for k in shapes if k[:2] != (colour, shape)]
        if q == "Is there another shape?":
            assert (a == "yes") == (len(others) == 1), sid
            return
        (o_colour, o_shape, o_x), = others
        size = arrays[0].shape[1]
        if q.startswith("And the "):
            assert q == f"And the {o_colour} {o_shape}?" and a == ("left" if o_x < size / 2 else "right"), sid
            assert a != first[1], sid  # the other shape is on the other side
        else:
            assert prev == ("Is there another shape?", "yes"), sid
            assert a == (o_colour if q == "What colour is it?" else o_shape), sid


def test_followup_answers_match_pictures_and_earlier_turns(dialog_dir):
    seen = Counter()
    for s in read_jsonl(dialog_dir / "train.jsonl"):
        arrays = [pixels(dialog_dir / rel) for rel in s["images"]]
        pairs = qa_pairs(s)
        for k in range(1, len(pairs)):
            _check_followup(s["type"], pairs[0], pairs[k - 1], *pairs[k], arrays, s["id"])
            seen[(s["type"], pairs[k][0].split()[0])] += 1
    # every type got follow-ups, of more than one kind where it has several
    assert {t for t, _ in seen} == set(VOCAB)
    assert len({w for t, w in seen if t == "position"}) == 3 and len({w for t, w in seen if t == "count"}) == 2


def test_followup_probability_and_option_errors(tmp_path, shapes_dir):
    out = tmp_path / "some"
    assert make_shapes.main([str(out), "--n-train", "200", "--n-val", "0", "--seed", "3", "--followups", "0.3"]) == 0
    train = read_jsonl(out / "train.jsonl")
    n_dialog = sum(len(s["messages"]) > 2 for s in train)
    assert 30 <= n_dialog <= 90  # ~60 of 200
    plain = read_jsonl(shapes_dir / "train.jsonl")  # the same seed without follow-ups: the same first turns
    assert [s["messages"][:2] for s in train] == [s["messages"] for s in plain]
    with pytest.raises(SourceError, match="--followups 1.5"):
        make_shapes.main([str(tmp_path / "bad"), "--followups", "1.5"])


def test_followup_answers_are_trained(dialog_dir, tmp_path):
    """Rendered with the demo's own vocabulary, a dialog's labels hold every answer, in order, and nothing else."""
    from qwenvl_lab.dataprocess import make_vocab
    from qwenvl_lab.dataset.formats import normalize
    from qwenvl_lab.dataset.rendering import IGNORE_INDEX, render
    from qwenvl_lab.qwen.tokenizer import load_tokenizer

    assert make_vocab.main(["--data", str(dialog_dir / "train.jsonl"), "--merges", "200", "--out", str(tmp_path)]) == 0
    tok = load_tokenizer(tmp_path)
    for pos, rec in enumerate(read_jsonl(dialog_dir / "val.jsonl")):
        sample = normalize(rec, pos, "val.jsonl", image_folder=str(dialog_dir))
        r = render(sample, tok, tokens_per_image=4)
        supervised = tok.decode([t for t in r.labels if t != IGNORE_INDEX])
        answers = [a for _, a in qa_pairs(rec)]
        assert supervised == "".join(f"{a}<|im_end|>" for a in answers), (rec["id"], supervised)


def test_distractor_option(tmp_path):
    """--distractor sets how often a position picture has a second shape; the target stays where it was."""
    runs = {}
    for p in (0.0, 1.0):
        out = tmp_path / f"d{p}"
        make_shapes.make_shapes(out, n_train=30, n_val=0, seed=5, size=64, types=["position"], distractor=p)
        runs[p] = (out, read_jsonl(out / "train.jsonl"))
    for none, every in zip(runs[0.0][1], runs[1.0][1]):
        assert none["messages"] == every["messages"]  # same target, question and side
        a0, a1 = pixels(runs[0.0][0] / none["images"][0]), pixels(runs[1.0][0] / every["images"][0])
        assert len(components(foreground(a0))) == 1 and len(components(foreground(a1))) == 2
        target = foreground(a0)
        assert (a1[target] == a0[target]).all()  # the target's pixels are unchanged
    with pytest.raises(SourceError, match="--distractor"):
        make_shapes.main([str(tmp_path / "bad"), "--distractor", "-0.1"])


def test_recall_followups(tmp_path, shapes_dir):
    """--followup-set recall: the same scenes and first turns; each later turn names another attribute of the
    picture or repeats an earlier answer, and none is a yes/no comparison."""
    out = tmp_path / "recall"
    make_shapes.make_shapes(out, n_train=200, n_val=0, seed=3, size=64, followups=1.0, followup_set="recall")
    plain = read_jsonl(shapes_dir / "train.jsonl")
    for p, s in zip(plain, read_jsonl(out / "train.jsonl")):
        assert s["messages"][:2] == p["messages"] and s["images"] == p["images"]
        pairs = qa_pairs(s)
        assert len(pairs) in (2, 3) and all(a not in ("yes", "no") for _, a in pairs[1:]), s["id"]
        arrays = [pixels(out / rel) for rel in s["images"]]
        first_q, first_a = pairs[0]
        for q, a in pairs[1:]:
            if s["type"] == "multi":
                _check_followup("multi", pairs[0], pairs[0], q, a, arrays, s["id"])
                continue
            shapes = kinds(arrays[0])
            if q.endswith("again?"):
                assert a == first_a, s["id"]
            elif q.startswith("And how many"):
                assert int(a) == int(first_a) + 1 == len(shapes) + 1, s["id"]
            elif q.startswith("And the "):
                assert len(shapes) == 2 and a != first_a, s["id"]
            else:  # "What colour / shape is it?" about the one shape (position: the named one)
                colour, shape, _ = shapes[0] if len(shapes) == 1 else (None, None, None)
                assert len(shapes) == 1 and a == (shape if "shape" in q else colour), s["id"]
    assert json.loads((out / "meta.json").read_text())["followup_set"] == "recall"
    with pytest.raises(SystemExit):
        make_shapes.main([str(tmp_path / "bad"), "--followup-set", "none"])


def test_wide_and_tall_canvases(tmp_path, shapes_dir):
    """--canvas 4: colour and shape pictures 4x wider or taller, the shape sized by the short side and
    matching the answer; other types stay square; --canvas 1 is byte-identical to the default."""
    out = tmp_path / "wide"
    make_shapes.make_shapes(out, n_train=40, n_val=0, seed=0, size=32, types=["colour", "shape", "count"], canvas=4)
    orientations = set()
    for s in read_jsonl(out / "train.jsonl"):
        a = pixels(out / s["images"][0])
        h, w = a.shape[:2]
        if s["type"] == "count":
            assert (w, h) == (32, 32), s["id"]
            continue
        assert sorted((w, h)) == [32, 128], s["id"]
        orientations.add(w > h)
        mask = foreground(a)
        ys, xs = np.nonzero(mask)
        assert max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 <= 2 * round(32 * 0.3) + 1, s["id"]  # r by the short side
        answer = s["messages"][1]["content"]
        assert (dominant_colour(a, mask) if s["type"] == "colour" else shape_name(mask)) == answer, s["id"]
    assert orientations == {True, False}
    one = tmp_path / "one"
    make_shapes.make_shapes(one, n_train=6, n_val=0, seed=0, size=64, canvas=1)
    ref = tmp_path / "ref"
    make_shapes.make_shapes(ref, n_train=6, n_val=0, seed=0, size=64)
    assert (one / "train.jsonl").read_bytes() == (ref / "train.jsonl").read_bytes()
    with pytest.raises(ValueError, match="--canvas"):
        make_shapes.make_shapes(tmp_path / "bad", n_train=1, n_val=0, canvas=0)
