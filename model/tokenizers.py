"""Any transformers tokenizer behind the small interface the data path uses (the one qwen/tokenizer.py's
Qwen tokenizers have).

Contract:
- `HFTokenizer(path_or_tokenizer)`: `encode(text) -> ids` (no BOS/EOS added; special-token strings in
  the text are split like ordinary text, so user text never becomes a control token), `decode(ids,
  skip_special_tokens=False)`, `__len__`, `token_to_id(token) -> int` (KeyError when absent),
  `add_special_tokens(tokens) -> list[str]` (the ones it had to add), `save_pretrained(dir)`,
  `chat_template` (the tokenizer's own Jinja text or None), `eos_token_id`, `pad_token_id`, `hf_tokenizer`.
- `load_lm_tokenizer(path)`: the Qwen interface (qwen.load_tokenizer) when the files are a Qwen
  vocabulary (`qwen.tiktoken`, or a `tokenizer.json` with ChatML's tokens and Qwen's image placeholder),
  else `HFTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..qwen import load_tokenizer
from ..qwen.tokenizer import encode_as_text

TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")
QWEN_VISION_PLACEHOLDERS = ("<|image_pad|>", "<|extra_0|>")  # Qwen2-VL's, Qwen-1's


class HFTokenizer:
    def __init__(self, path_or_tokenizer: str | Path | PreTrainedTokenizerBase):
        if isinstance(path_or_tokenizer, PreTrainedTokenizerBase):
            self._tok = path_or_tokenizer
        else:
            self._tok = AutoTokenizer.from_pretrained(str(path_or_tokenizer))

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tok

    @property
    def chat_template(self) -> str | None:
        t = getattr(self._tok, "chat_template", None)
        return t if isinstance(t, str) else None

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._tok.pad_token_id

    def __len__(self) -> int:
        return len(self._tok)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    def encode(self, text: str) -> list[int]:
        return encode_as_text(self._tok, text)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _id_or_none(self, token: str) -> int | None:
        """The fast tokenizer's own lookup: `get_vocab()` copies the whole vocabulary on every call."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        i = backend.token_to_id(token) if backend is not None else self._tok.get_vocab().get(token)
        return None if i is None else int(i)

    def token_to_id(self, token: str) -> int:
        i = self._id_or_none(token)
        if i is None:
            raise KeyError(f"{token!r} is not in this tokenizer's vocabulary")
        return i

    def add_special_tokens(self, tokens: list[str]) -> list[str]:
        missing = [t for t in tokens if self._id_or_none(t) is None]
        if missing:
            self._tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                                 special_tokens=True)
        return missing

    def save_pretrained(self, out_dir: str | Path) -> None:
        self._tok.save_pretrained(str(out_dir))


def has_tokenizer_files(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def load_lm_tokenizer(path: str | Path):
    """The Qwen interface for a Qwen vocabulary (`qwen.tiktoken`, or ChatML plus Qwen's own vision tokens),
    else HFTokenizer (a ChatML tokenizer such as SmolLM's keeps its own tokens: nothing Qwen's is added)."""
    p = Path(path)
    if (p / "qwen.tiktoken").is_file() or _is_qwen_vocab(p / "tokenizer.json"):
        return load_tokenizer(p)
    return HFTokenizer(p)


def _is_qwen_vocab(file: Path) -> bool:
    """ChatML's `<|im_start|>` and one of Qwen's vision placeholders among `tokenizer.json`'s tokens: read
    from the file, so a Qwen vocabulary is not loaded twice (once to look, once by `load_tokenizer`)."""
    if not file.is_file():
        return False
    spec = json.loads(file.read_text(encoding="utf-8"))
    vocab = (spec.get("model") or {}).get("vocab")
    names = {t.get("content") for t in spec.get("added_tokens") or []}
    if isinstance(vocab, (dict, list)):  # BPE / WordPiece: {token: id}; Unigram: [[token, score], ...]
        names |= set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab}
    return "<|im_start|>" in names and any(t in names for t in QWEN_VISION_PLACEHOLDERS)
