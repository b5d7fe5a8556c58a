"""Qwen tokenizers behind one small interface.

Contract
--------
`load_tokenizer(dir) -> QwenTokenizerBase`:
* `QWenTokenizer` when `dir/qwen.tiktoken` exists (Qwen-1: tiktoken BPE, specials appended after the
  mergeable ranks: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>` ... `<|extra_204|>`;
  a Qwen-VL(-Chat) directory (`is_qwen_vl_dir`: config.json has `visual`, or a saved tokenizer_config.json
  says `qwen_vl`) adds Qwen-VL's nine: `<ref>` `</ref>` `<box>` `</box>` `<quad>` `</quad>` `<img>` `</img>`
  `<imgpad>`, and its image roles: start `<img>`, end `</img>`, placeholder `<imgpad>`);
* `HFQwenTokenizer` when `dir/tokenizer.json` exists (Qwen2 / 2.5 / 3, read through transformers).

Both expose `encode(text) -> list[int]` (text NEVER becomes a special token: a user typing
"<|im_end|>" gets ordinary text ids), `decode(ids, skip_special_tokens=False)`, `__len__`,
`token_to_id(special_token)`, `save_pretrained(dir)` and the ids `eod_id`, `im_start_id`, `im_end_id`,
`image_token_id` (placeholder), `image_start_id`, `image_end_id`, `video_token_id`, `pad_id`.
No BOS is ever added.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import unicodedata
from pathlib import Path

import tiktoken
from tokenizers import AddedToken

log = logging.getLogger(__name__)

VOCAB_FILE = "qwen.tiktoken"
HF_TOKENIZER_FILE = "tokenizer.json"

# The Qwen split pattern (also the one in transformers' Qwen2 tokenizer.json). tiktoken runs it.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
N_EXTRA = 205
QWEN1_SPECIALS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(N_EXTRA))
# Vision-language roles of Qwen-1's spare specials.
QWEN1_VL_TOKENS = {
    "image_token": "<|extra_0|>",
    "image_start": "<|extra_1|>",
    "image_end": "<|extra_2|>",
    "video_token": "<|extra_3|>",
}
# Qwen-VL(-Chat)'s tokenizer appends nine more specials after Qwen-1's (151851 ... 151859 with the real
# vocabulary): its image span is `<img>` + 256 rows + `</img>`, the rows' ids being `<imgpad>`.
QWENVL_EXTRA = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
QWENVL_TOKENS = {
    "image_token": "<imgpad>",
    "image_start": "<img>",
    "image_end": "</img>",
    "video_token": "<|extra_3|>",  # Qwen-VL has no video; kept on Qwen-1's role
}
QWEN2_VL_TOKENS = {
    "image_token": "<|image_pad|>",
    "image_start": "<|vision_start|>",
    "image_end": "<|vision_end|>",
    "video_token": "<|video_pad|>",
}


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64(token) rank` lines; errors name the file and line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r}")
        try:
            ranks[base64.b64decode(parts[0])] = int(parts[1])
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: bad token or rank: {e}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    return ranks


class QwenTokenizerBase:
    """Shared helpers; subclasses set `_special_ids` and implement encode/decode/__len__."""

    _special_ids: dict[str, int]
    _vl: dict[str, str]

    def token_to_id(self, token: str) -> int:
        if token not in self._special_ids:
            raise KeyError(f"{token!r} is not a special token of this tokenizer")
        return self._special_ids[token]

    @property
    def eod_id(self) -> int:
        return self._special_ids[ENDOFTEXT]

    @property
    def pad_id(self) -> int:
        # Qwen has no pad token; padding positions are masked anyway, so <|endoftext|> is used.
        return self.eod_id

    @property
    def im_start_id(self) -> int:
        return self._special_ids[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special_ids[IM_END]

    @property
    def image_token_id(self) -> int:
        return self._special_ids[self._vl["image_token"]]

    @property
    def image_start_id(self) -> int:
        return self._special_ids[self._vl["image_start"]]

    @property
    def image_end_id(self) -> int:
        return self._special_ids[self._vl["image_end"]]

    @property
    def video_token_id(self) -> int:
        return self._special_ids[self._vl["video_token"]]

    @property
    def special_ids(self) -> set[int]:
        return set(self._special_ids.values())

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def save_pretrained(self, out_dir: str | Path) -> None:
        raise NotImplementedError


class QWenTokenizer(QwenTokenizerBase):
    """Qwen-1's tiktoken tokenizer read from `qwen.tiktoken`."""

    def __init__(self, vocab_file: str | Path, qwen_vl: bool = False):
        self.vocab_file = Path(vocab_file)
        self.qwen_vl = bool(qwen_vl)  # Qwen-VL(-Chat): QWENVL_EXTRA after Qwen-1's specials
        if not self.vocab_file.is_file():
            raise FileNotFoundError(f"Qwen-1 vocabulary file not found: {self.vocab_file}")
        ranks = read_tiktoken_ranks(self.vocab_file)
        self.n_ranks = len(ranks)
        # Specials follow the mergeable ranks (151643.. for the real vocabulary).
        specials = QWEN1_SPECIALS + (QWENVL_EXTRA if self.qwen_vl else ())
        self._special_ids = {tok: self.n_ranks + i for i, tok in enumerate(specials)}
        self._vl = QWENVL_TOKENS if self.qwen_vl else QWEN1_VL_TOKENS
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self._special_ids
        )
        self._id_to_special = {i: t for t, i in self._special_ids.items()}

    def __len__(self) -> int:
        return self.n_ranks + len(self._special_ids)

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        # disallowed_special=() makes special-looking text plain text instead of an error or a special id.
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} outside the vocabulary of {self.vocab_file} "
                             f"(size {len(self)})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._id_to_special]
        return self._enc.decode(ids, errors="replace")

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if (out / VOCAB_FILE).resolve() != self.vocab_file.resolve():
            shutil.copyfile(self.vocab_file, out / VOCAB_FILE)
        cfg = {"model_max_length": 32768, "tokenizer_class": "QWenTokenizer"}
        if self.qwen_vl:
            cfg["qwen_vl"] = True  # reloads with Qwen-VL's specials (load_tokenizer)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


class HFQwenTokenizer(QwenTokenizerBase):
    """A Qwen2 / 2.5 / 3 `tokenizer.json` through transformers, with the same small interface.

    Missing vision tokens (`<|image_pad|>`, `<|vision_start|>`, `<|vision_end|>`, `<|video_pad|>`) are
    added as special tokens; they get ids past the vocabulary, which fit in the spare embedding rows
    of the released checkpoints. `added_vl_tokens` lists what was added.
    """

    def __init__(self, path: str | Path):
        from transformers import PreTrainedTokenizerFast

        self.path = Path(path)
        if not (self.path / HF_TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path / HF_TOKENIZER_FILE}")
        self._tok = PreTrainedTokenizerFast.from_pretrained(str(self.path))
        vocab = self._tok.get_vocab()
        # A converted Qwen-1 vocabulary keeps Qwen-1's <|extra_i|> roles; Qwen2/2.5/3 use the vision tokens.
        qwen1_like = QWEN1_VL_TOKENS["image_token"] in vocab and QWEN2_VL_TOKENS["image_token"] not in vocab
        self._vl = QWEN1_VL_TOKENS if qwen1_like else QWEN2_VL_TOKENS
        for name in (ENDOFTEXT, IM_START, IM_END):
            if name not in vocab:
                raise ValueError(f"{self.path / HF_TOKENIZER_FILE}: required special token {name} is missing")
        self.added_vl_tokens = [t for t in self._vl.values() if t not in vocab]
        if self.added_vl_tokens:
            log.warning("%s: vocabulary lacks %s; added as special tokens (ids from %d, spare embedding rows)",
                        self.path / HF_TOKENIZER_FILE, self.added_vl_tokens, len(self._tok))
            self._tok.add_tokens([AddedToken(t, special=True) for t in self.added_vl_tokens],
                                 special_tokens=True)
        vocab = self._tok.get_vocab()
        names = {t.content for t in self._tok.backend_tokenizer.get_added_tokens_decoder().values()}
        self._special_ids = {t: vocab[t] for t in names}

    @property
    def hf_tokenizer(self):
        """The wrapped transformers tokenizer (e.g. for exporting with a checkpoint)."""
        return self._tok

    def __len__(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        return encode_as_text(self._tok, text)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} outside the vocabulary of {self.path} (size {len(self)})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, out_dir: str | Path) -> None:
        self._tok.save_pretrained(str(out_dir))


def encode_as_text(tok, text: str) -> list[int]:
    """Ids of `text` with a transformers tokenizer, no BOS/EOS added, and special-token strings in the
    text split like ordinary text: user text never becomes a control token."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = False


def load_tokenizer(path: str | Path) -> QwenTokenizerBase:
    """Pick the tokenizer from the files in `path` (a checkpoint or tokenizer directory)."""
    p = Path(path)
    if (p / VOCAB_FILE).is_file():
        return QWenTokenizer(p / VOCAB_FILE, qwen_vl=is_qwen_vl_dir(p))
    if (p / HF_TOKENIZER_FILE).is_file():
        return HFQwenTokenizer(p)
    raise FileNotFoundError(
        f"no tokenizer in {p}: expected {VOCAB_FILE} (Qwen-1) or {HF_TOKENIZER_FILE} (Qwen2/2.5/3)"
    )


def _json_dict(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def is_qwen_vl_dir(path: str | Path) -> bool:
    """A Qwen-VL(-Chat) checkpoint (config.json with a `visual` dict) or a tokenizer saved from one."""
    p = Path(path)
    return isinstance(_json_dict(p / "config.json").get("visual"), dict) or bool(
        _json_dict(p / "tokenizer_config.json").get("qwen_vl"))
