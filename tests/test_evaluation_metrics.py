"""Metrics: hand-computed cases and the official VQA normaliser's documented behaviour."""

import math

import pytest
from qwenvl_lab.evaluation.metrics import (
    anls,
    caption_scores,
    exact_match,
    extract_choice,
    java_available,
    levenshtein,
    mme_yes_no,
    pope,
    pope_yes_no,
    relaxed_accuracy,
    vqa_accuracy,
)
from qwenvl_lab.evaluation.normalize import normalize_answer


@pytest.mark.parametrize("raw, norm", [
    ("Two dogs.", "2 dogs"),          # number words -> digits, the final period goes
    ("none", "0"),
    ("The cat", "cat"),               # articles dropped
    ("a man and an apple", "man and apple"),
    ("dont", "don't"),                # contractions get their apostrophe
    ("Whats that?", "what's that"),
    ("couldnt've", "couldn't've"),
    ("yes!", "yes"),                  # punctuation touching nothing but a word end -> deleted
    ("t-shirt", "t shirt"),           # punctuation inside a word -> a space
    ("left - right", "left right"),   # punctuation next to a space -> deleted
    ("1,000", "1000"),                # digit-comma-digit: commas deleted
    ("3.5", "3.5"),                   # a decimal point stays
    ("4.", "4"),                      # a period after a digit goes when no digit follows
    ("  Red\tsquare\n", "red square"),
    ("well", "well"),                 # a word, not a contraction
])
def test_vqa_normaliser(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_leave_one_out():
    ten = ["2"] * 2 + ["3"] * 8
    # 2 humans agree: the 2 subsets without one of them hold 1 match (1/3), the 8 others hold 2 (2/3).
    assert vqa_accuracy("2", ten) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_accuracy("two", ten) == pytest.approx(0.6)  # normalised before matching
    three = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("cat", three) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("Cat.", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert vqa_accuracy("bird", three) == 0.0
    assert vqa_accuracy("The cat", ["cat"]) == 1.0  # one answer: exact match after normalisation
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_exact_match():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("two", ["1", "2"]) == 1.0
    assert exact_match("no", "yes") == 0.0


def test_anls_hand_computed():
    assert levenshtein("kitten", "sitting") == 3
    assert anls("hello", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)           # 1 edit / 5
    assert anls("abcd", ["abce"]) == pytest.approx(0.75)
    assert anls("ab", ["cd"]) == 0.0                                  # NL = 1 >= 0.5
    assert anls("abcd", ["abxy"]) == 0.0                              # NL = 0.5 is not < 0.5
    assert anls("  Annual   REPORT ", ["annual report"]) == 1.0       # case and spaces
    assert anls("1/8/93", ["January 8, 1993", "1/8/93"]) == 1.0       # the best answer counts


def test_relaxed_accuracy():
    assert relaxed_accuracy("20.5", "20.5") == 1.0
    assert relaxed_accuracy("21.5", "20.5") == 1.0      # 4.9% off
    assert relaxed_accuracy("21.6", "20.5") == 0.0      # 5.4% off
    assert relaxed_accuracy("50%", "0.5") == 1.0
    assert relaxed_accuracy("blue", "Blue") == 1.0
    assert relaxed_accuracy("0", "0") == 1.0            # a zero target: exact match
    assert relaxed_accuracy("0.01", "0") == 0.0


def test_pope_hand_computed():
    preds = ["Yes, there is.", "yes", "No.", "There is not a dog.", "yes"]
    labels = ["yes", "no", "no", "yes", "yes"]
    # TP: 0, 4; FP: 1; TN: 2; FN: 3
    m = pope(preds, labels)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
    assert set(m) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert pope_yes_no("No, it is not.") == "no" and pope_yes_no("Nothing else. No.") == "yes"
    with pytest.raises(ValueError):
        pope(["yes"], ["maybe"])


def test_mme_reading():
    assert mme_yes_no("Yes") == "yes" and mme_yes_no("no") == "no"
    assert mme_yes_no("Yes, it is.") == "yes" and mme_yes_no("No, never") == "no"
    assert mme_yes_no("I think so") == "other"


@pytest.mark.parametrize("text, expect", [
    ("B", 1), ("B.", 1), ("(C) blue", 2), ("The answer is A.", 0), ("Answer: C", 2), ("I pick D", None),
    ("green", 1), ("red or green", None), ("E", None), ("", None), ("A cat", 0),
])
def test_extract_choice(text, expect):
    assert extract_choice(text, 3, ["red", "green", "blue"]) == expect


def test_caption_scores_hand_computed():
    # BLEU-4 of "a b c d e" vs "a b c d f": precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty.
    s = caption_scores({1: "a b c d e"}, {1: ["a b c d f"]}, meteor=False, spice=False, tokenizer="python")
    assert s["BLEU-4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)
    # CIDEr-D of two images captioned exactly as their single reference: uni- and bigram cosines are 1,
    # tri- and 4-grams do not exist: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    s = caption_scores({1: "a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]}, meteor=False, spice=False,
                       tokenizer="python")
    assert s["CIDEr"] == pytest.approx(5.0)
    assert {"BLEU-4", "CIDEr"} <= set(s)
    wrong = caption_scores({1: "x y", 2: "z w"}, {1: ["a b"], 2: ["c d"]}, meteor=False, spice=False,
                           tokenizer="python")
    assert wrong["CIDEr"] == 0.0 and wrong["BLEU-4"] < 1e-3


def test_caption_scores_ptb_tokenizer():
    if not java_available():
        pytest.skip("no Java: the PTB tokenizer (pycocoevalcap's jar) cannot run")
    s = caption_scores({1: "A Man, riding a horse.", 2: "Two dogs play!"},
                       {1: ["a man riding a horse"], 2: ["two dogs play"]}, meteor=False, spice=False, tokenizer="ptb")
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # lower-cased, punctuation removed by the PTB tokenizer


def test_caption_scores_without_java_say_once(monkeypatch, capsys):
    import qwenvl_lab.evaluation.metrics as m

    monkeypatch.setattr(m, "_JAVA", False)
    monkeypatch.setattr(m, "_said", set())
    for _ in range(2):
        s = caption_scores({1: "a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]})
        assert set(s) == {"BLEU-4", "CIDEr"} and math.isclose(s["CIDEr"], 5.0)
    err = capsys.readouterr().err
    assert err.count("Java not found") == 1


def test_spice_never_downloads(monkeypatch, capsys):
    """SPICE without CoreNLP's jars is skipped with one notice; the downloader is never called."""
    import pycocoevalcap.spice.get_stanford_models as gsm
    import qwenvl_lab.evaluation.metrics as m

    monkeypatch.setattr(m, "_JAVA", True)
    monkeypatch.setattr(m, "_said", set())
    monkeypatch.setattr(m, "_spice_ready", lambda: False)
    monkeypatch.setattr(gsm, "urlretrieve", lambda *a, **k: pytest.fail("SPICE tried the network"))
    s = caption_scores({1: "a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]}, meteor=False, tokenizer="python")
    assert "SPICE" not in s
    assert "SPICE skipped" in capsys.readouterr().err
