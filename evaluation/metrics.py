"""Benchmark metrics: pure functions of predictions and references (no model, no files).

Stable names (scripts import them):
- `vqa_accuracy(pred, answers) -> float`: VQA accuracy of one prediction against the human answers
  (10 for VQAv2 / TextVQA / VizWiz). Prediction and answers are normalised (`evaluation.normalize`);
  with n >= 2 answers the score is the mean over the n leave-one-out subsets of
  `min(#humans in the subset who gave the prediction / 3, 1)`; with one answer it is exact match.
- `anls(pred, answers, threshold=0.5) -> float`: Average Normalised Levenshtein Similarity of one
  prediction (DocVQA): max over answers of `1 - NL` when `NL < threshold`, else 0; NL is the edit distance
  over the longer length, after lower-casing and collapsing spaces.
- `relaxed_accuracy(pred, target, tolerance=0.05) -> float`: ChartQA's rule: a number within 5% of a
  numeric target (a trailing "%" divides by 100), otherwise case-insensitive exact match.
- `pope(preds, labels) -> dict` with keys accuracy, precision, recall, f1, yes_ratio ("yes" is the
  positive class; `yes_ratio` is the share of predictions that say yes). Free-form predictions are read
  with LLaVA's POPE rule (`pope_yes_no`).
- `caption_scores(preds, refs) -> dict` with keys `BLEU-4` and `CIDEr` (CIDEr-D, as the COCO caption
  evaluation computes them, through the `pycocoevalcap` package), plus `METEOR` where Java runs and `SPICE`
  where Java runs and Stanford CoreNLP's jars are already in pycocoevalcap's folder. A metric that cannot
  run is named once on stderr, never downloaded.
- `extract_choice(text, n_options, options=None) -> int | None`: the option a free-form answer picks.
- `exact_match(pred, answers) -> float`, `mme_yes_no(text) -> str`.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .normalize import normalize_answer

LETTERS = "ABCDEFGHIJ"
_said: set[str] = set()


def say_once(message: str) -> None:
    """Print a notice on stderr the first time it comes up in this process."""
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr)


# ----- short answers --------------------------------------------------------------------------------
def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """VQA accuracy of `pred` against the human `answers` (see the module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy: no reference answers")
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(p == gts[0])
    matches = sum(g == p for g in gts)
    total = 0.0
    for g in gts:  # leave this human out: count the others who agree with the prediction
        others = matches - (g == p)
        total += min(others / 3.0, 1.0)
    return total / len(gts)


def exact_match(pred: str, answers: list[str] | str) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    answers = [answers] if isinstance(answers, str) else answers
    p = normalize_answer(pred)
    return float(any(normalize_answer(a) == p for a in answers))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_text(s: str) -> str:
    return " ".join(s.strip().lower().split())


def anls(pred: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction (see the module docstring)."""
    if not answers:
        raise ValueError("anls: no reference answers")
    p = _anls_text(pred)
    best = 0.0
    for a in answers:
        g = _anls_text(a)
        longest = max(len(p), len(g))
        nl = levenshtein(p, g) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    text = text.strip().replace(",", "")
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (see the module docstring)."""
    p, t = _to_float(pred), _to_float(target)
    if p is not None and t:  # a zero target has no relative error: exact match below
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(pred.strip().lower() == target.strip().lower())


# ----- yes / no -------------------------------------------------------------------------------------
def pope_yes_no(text: str) -> str:
    """LLaVA's POPE reading: the first sentence, commas dropped; "no"/"No"/"not" as a word -> no, else yes."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def pope(preds: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 ("yes" positive) and the share of yes predictions."""
    if len(preds) != len(labels):
        raise ValueError(f"pope: {len(preds)} predictions but {len(labels)} labels")
    if not preds:
        raise ValueError("pope: no predictions")
    p = [pope_yes_no(x) == "yes" for x in preds]
    g = []
    for lab in labels:
        lab = lab.strip().lower()
        if lab not in ("yes", "no"):
            raise ValueError(f"pope: label {lab!r} is not yes/no")
        g.append(lab == "yes")
    tp = sum(a and b for a, b in zip(p, g))
    fp = sum(a and not b for a, b in zip(p, g))
    fn = sum(not a and b for a, b in zip(p, g))
    tn = sum(not a and not b for a, b in zip(p, g))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(p), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p) / len(p)}


def mme_yes_no(text: str) -> str:
    """MME's reading of an answer: "yes"/"no" exactly, else by the first four characters, else "other"."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


# ----- multiple choice ------------------------------------------------------------------------------
def extract_choice(text: str, n_options: int, options: list[str] | None = None) -> int | None:
    """Index of the option a free-form answer picks, or None when it picks none or several.

    In order: a leading letter ("B", "B.", "(B)", "B) cat"); "answer is B" / "Answer: B"; exactly one
    valid letter standing alone in the text; exactly one option text contained in the answer."""
    letters = LETTERS[:n_options]
    t = text.strip()
    m = re.match(rf"^\(?([{letters}])(?:[\s.):,]|$)", t)
    if m:
        return letters.index(m.group(1))
    m = re.search(rf"answer(?: is)?[\s:]*\(?([{letters}])\b", t, flags=re.IGNORECASE)
    if m:
        return letters.index(m.group(1).upper())
    alone = set(re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", t))
    if len(alone) == 1:
        return letters.index(alone.pop())
    if options:
        low = t.lower()
        hits = [i for i, o in enumerate(options[:n_options]) if o and o.strip().lower() in low]
        if len(hits) == 1:
            return hits[0]
    return None


# ----- captions -------------------------------------------------------------------------------------
_JAVA: bool | None = None
_PUNCT_TOKENS = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
                 "...", ";"}


def java_available() -> bool:
    """A working `java` on PATH (checked once per process)."""
    global _JAVA
    if _JAVA is None:
        exe = shutil.which("java")
        try:
            _JAVA = exe is not None and subprocess.run([exe, "-version"], capture_output=True,
                                                       timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            _JAVA = False
    return _JAVA


def _python_tokenize(text: str) -> str:
    """Lower case, punctuation split off and dropped: close to the PTB tokenizer's output for captions."""
    tokens = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|'[a-z]+|[^\sa-z0-9]", text.lower().replace("\n", " "))
    return " ".join(t for t in tokens if t not in _PUNCT_TOKENS)


def _tokenize(captions: dict, use_java: bool) -> dict:
    """{id: [str]} -> {id: [tokenised str]} (PTB tokenizer with Java, a Python tokenizer without)."""
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # optional dependency

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [_python_tokenize(c) for c in v] for k, v in captions.items()}


def _spice_ready() -> bool:
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").is_file() and (lib / "stanford-corenlp-3.6.0-models.jar").is_file()


def caption_scores(preds: dict, refs: dict, meteor: bool = True, spice: bool = True,
                   tokenizer: str = "auto") -> dict:
    """COCO caption metrics of `preds` {id: caption} against `refs` {id: [captions]} (module docstring).

    `tokenizer`: "auto" (PTB with Java, else Python), "ptb" or "python"."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu  # optional dependency: pip install '.[eval]'
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise RuntimeError("caption metrics need the pycocoevalcap package: pip install '.[eval]'") from None
    missing = [k for k in preds if k not in refs]
    if missing:
        raise ValueError(f"caption_scores: {len(missing)} prediction id(s) have no references, e.g. {missing[0]!r}")
    if not preds:
        raise ValueError("caption_scores: no predictions")
    java = java_available()
    if tokenizer == "auto":
        use_java = java
        if not java:
            say_once("captions: Java not found: tokenised in Python (scores may differ slightly from the PTB "
                     "tokenizer's); METEOR and SPICE skipped")
    else:
        use_java = tokenizer == "ptb"
    ids = sorted(preds, key=str)
    res = _tokenize({k: [preds[k]] for k in ids}, use_java)
    gts = _tokenize({k: list(refs[k]) for k in ids}, use_java)
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their internals
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out["BLEU-4"] = float(bleu[3])
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor and java:
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            scorer = Meteor()  # a JVM reading stdin; a dead one gives an empty line (ValueError), never a hang
            try:
                out["METEOR"] = float(scorer.compute_score(gts, res)[0])
            finally:
                scorer.meteor_p.kill()
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            say_once(f"captions: METEOR failed ({e}); skipped")
    if spice and java:
        if _spice_ready():
            from pycocoevalcap.spice.spice import Spice

            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    out["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                say_once(f"captions: SPICE failed ({e}); skipped")
        else:
            say_once("captions: SPICE skipped: it needs Stanford CoreNLP 3.6.0 (stanford-corenlp-3.6.0.jar and "
                     "-models.jar) in pycocoevalcap/spice/lib; fetch them once on a machine with internet "
                     "(python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models; "
                     "get_stanford_models()')")
    return out
