"""Train a small byte-level BPE vocabulary and write it as a Qwen-1 `qwen.tiktoken` file.

    python -m qwenvl_lab.dataprocess.make_vocab --data data/shapes/train.jsonl --merges 300 --out DIR

Used by the offline demo, whose LM is trained from scratch: a vocabulary learned on the demo's own text
makes every answer word one token and keeps sequences short. The file has the real format
(`base64(token) rank` per line; ranks 0-255 are the single bytes), so `qwen.load_tokenizer(DIR)` reads it
and appends Qwen-1's special tokens after the last rank, exactly as for the real vocabulary.

Pieces are split with the same regex the tokenizer uses before BPE, so merges never cross a piece
boundary the tokenizer would not cross either; ties between equally frequent pairs break on the bytes,
so the output is deterministic.
"""

from __future__ import annotations

import argparse
import base64
import unicodedata
from collections import Counter
from pathlib import Path

import regex

from ..core.cli import run_cli
from ..dataset.formats import read_records
from ..dataset.sample import IMAGE_MARKER, VIDEO_MARKER

# Qwen's pre-tokenisation pattern (FACTS.md).
SPLIT = regex.compile(
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _texts_from_jsonl(path: Path) -> list[str]:
    """The message texts of a data file (our JSONL or a `.json` list), markers blanked out."""
    texts = []
    for _, rec in read_records(str(path)):
        for m in rec.get("messages", []):
            if isinstance(m.get("content"), str):
                texts.append(m["content"].replace(IMAGE_MARKER, " ").replace(VIDEO_MARKER, " "))
    return texts


def train_bpe(texts: list[str], n_merges: int) -> list[bytes]:
    """Tokens in rank order: the 256 single bytes, then up to `n_merges` learned merges."""
    words: Counter[tuple[bytes, ...]] = Counter()
    for text in texts:
        for piece in SPLIT.findall(unicodedata.normalize("NFC", text)):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    vocab = [bytes([b]) for b in range(256)]
    for _ in range(n_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best_n = max(pairs.values())
        if best_n < 2:
            break  # merging a pair seen once teaches nothing
        best = min(p for p, n in pairs.items() if n == best_n)
        merged = best[0] + best[1]
        vocab.append(merged)
        new_words: Counter[tuple[bytes, ...]] = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return vocab


def write_tiktoken(vocab: list[bytes], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "qwen.tiktoken"
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(vocab)))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="data files in our format (messages): JSONL or a .json list")
    ap.add_argument("--merges", type=int, default=300, help="number of BPE merges to learn")
    ap.add_argument("--out", required=True, help="directory for qwen.tiktoken")
    args = ap.parse_args(argv)
    texts: list[str] = []
    for p in args.data:
        texts += _texts_from_jsonl(Path(p))
    vocab = train_bpe(texts, args.merges)
    path = write_tiktoken(vocab, args.out)
    print(f"wrote {path}: {len(vocab)} tokens ({len(vocab) - 256} merges) from {len(texts)} texts")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
