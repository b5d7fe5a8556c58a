"""Answer normalisation of the VQA evaluation (VQAv2, and reused for TextVQA, VizWiz, GQA).

`normalize_answer(text) -> str` applies, in the official order:
1. newlines and tabs become spaces, surrounding spaces go;
2. punctuation: each of `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !` is deleted where it touches a space
   (or anywhere when the text has a digit-comma-digit group such as "1,000"), otherwise it becomes a
   space; a period not followed by a digit is deleted ("3.5" keeps its point, "yes." and "4." lose it);
3. lower case; the number words "none", "zero" ... "ten" become digits; the articles "a", "an", "the"
   are dropped;
4. contractions written without the apostrophe get it back ("dont" -> "don't", "whats" -> "what's").
Words are then joined by single spaces.

The apostrophe and the colon are not in the punctuation list, as in the official evaluation.
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# Contractions as annotators typed them without the apostrophe -> the form answers are compared in.
_CONTRACTION_FORMS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "i'd", "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't",
    "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't",
    "'ow's'at", "shan't", "she'd", "she'd've", "she'll", "she's", "should've", "shouldn't",
    "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll",
    "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll",
    "they're", "they've", "'twas", "wasn't", "we'd", "we'd've", "we'll", "we're", "we've", "weren't",
    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
    "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've",
    "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll",
    "you're", "you've",
)


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTION_FORMS:
        table[form.replace("'", "")] = form  # "dont" -> "don't"
        parts = form.split("'")
        if len(parts) == 3:  # two apostrophes: each one alone may be missing ("couldnt've", "couldn'tve")
            table[parts[0] + parts[1] + "'" + parts[2]] = form
            table[parts[0] + "'" + parts[1] + parts[2]] = form
    # Apostrophe-less forms that are also English words (or that the official table leaves alone) stay.
    for word in ("ill", "well", "were", "wed", "hell", "its", "id", "shell", "shed", "lets", "im", "ive", "shes"):
        table.pop(word, None)
    return table


CONTRACTIONS = _contraction_table()
# The official pattern also has a look-behind for a digit written as `(?!<=\d)`, which never applies: in
# effect every period not followed by a digit goes ("4." -> "4", "3.5" stays).
_PERIOD = re.compile(r"\.(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    has_number_comma = _COMMA_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official VQA normalisation of one answer (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))
