"""Chat templates as data: how each LM family lays out a conversation, token by token.

Contract:
- `ChatTemplate` describes one layout with plain strings in which the template's special tokens
  (`specials`) appear inline, e.g. Llama-3's header `"<|start_header_id|>user<|end_header_id|>\\n\\n"`.
  A message renders as `header[role] + content + suffix[role]`. For the assistant, the suffix starts with
  `end_of_turn`, which is supervised together with the content (the model learns to stop); the rest of
  the suffix (e.g. ChatML's trailing "\\n") is not. `bos` opens every conversation, `closing` ends a
  training conversation (unsupervised), `system` is either "native" (a message with its own header) or a
  format string folding the system text into the first user message (`"{system}\\n\\n{content}"`).
  `join_text=True` encodes a header's trailing text together with the following content when both are
  unsupervised (byte-level BPE then gives the same ids as tokenizing the whole string); ChatML keeps
  role, "\\n" and content separate, as Qwen's own code does.
- A template may also carry a prompt preset: `default_system` (the system message of a conversation that
  has none and no `system_prompt` is given), `user_prefix` (text put before every user message's content,
  encoded together with it) and `image_delimiters=False` (an image span is the placeholders alone, even
  for an LM that has image start/end tokens).
- `TEMPLATES`: name -> ChatTemplate: `chatml` (Qwen, SmolLM), `llama3`, `mistral` (`[INST]`, Llama-2
  style without the per-turn BOS), `gemma`, `phi3`, and `bigbro`: ChatML with the BigBro repo's prompt
  (system "你是一位图像理解助手。", user text prefixed "用中文回答：", the image rows bare in place of its
  `<|extra_0|>`), which its imported checkpoints use (model/bigbro.py).
- `OWN` (name "own", outside `TEMPLATES`): the checkpoint's own Jinja template as it is (`ChatFormat.jinja`),
  for a tokenizer whose template none of the above matches (LLaVA-1.5's).
- `detect_template(chat_template_text, model_type) -> name | None`: from the tokenizer's own Jinja
  template (its marker tokens), else from the LM's `model_type`; None when neither says.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .sample import ROLES


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    specials: tuple[str, ...]  # every special token the strings below use
    header: dict[str, str]  # role -> text before the content
    suffix: dict[str, str]  # role -> text after the content
    end_of_turn: str  # the assistant suffix starts with it; supervised
    bos: str | None = None
    closing: str = ""  # appended after a training conversation (not after a generation prompt)
    system: str = "native"  # or a format with {system} and {content}: folded into the first user turn
    join_text: bool = True
    default_system: str | None = None  # the system message when a conversation brings none
    user_prefix: str = ""  # put before every user message's content (encoded with it)
    image_delimiters: bool = True  # False: no image start/end ids around an image's placeholders
    _split: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.suffix["assistant"].startswith(self.end_of_turn):
            raise ValueError(f"template {self.name}: the assistant suffix must start with {self.end_of_turn!r}")
        alts = "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True))
        object.__setattr__(self, "_split", re.compile(f"({alts})"))

    def pieces(self, text: str) -> list[tuple[str, str]]:
        """`text` -> [("special", token) | ("text", chunk), ...] in order, empty chunks dropped."""
        return [("special" if p in self.specials else "text", p) for p in self._split.split(text) if p]

    @property
    def folds_system(self) -> bool:
        return self.system != "native"


def _per_role(fmt: str, names: dict[str, str] | None = None) -> dict[str, str]:
    names = names or {}
    return {r: fmt.format(role=names.get(r, r)) for r in ROLES}


CHATML = ChatTemplate(
    name="chatml", specials=("<|im_start|>", "<|im_end|>"),
    header=_per_role("<|im_start|>{role}\n"), suffix=_per_role("<|im_end|>\n"), end_of_turn="<|im_end|>",
    join_text=False,
)
LLAMA3 = ChatTemplate(
    name="llama3", specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    header=_per_role("<|start_header_id|>{role}<|end_header_id|>\n\n"), suffix=_per_role("<|eot_id|>"),
    end_of_turn="<|eot_id|>", bos="<|begin_of_text|>",
)
MISTRAL = ChatTemplate(
    name="mistral", specials=("<s>", "</s>", "[INST]", "[/INST]"),
    header={"system": "", "user": "[INST] ", "assistant": ""},
    suffix={"system": "", "user": " [/INST]", "assistant": "</s>"},
    end_of_turn="</s>", bos="<s>", system="{system}\n\n{content}",
)
GEMMA = ChatTemplate(
    name="gemma", specials=("<bos>", "<start_of_turn>", "<end_of_turn>"),
    header=_per_role("<start_of_turn>{role}\n", {"assistant": "model"}), suffix=_per_role("<end_of_turn>\n"),
    end_of_turn="<end_of_turn>", bos="<bos>", system="{system}\n\n{content}",
)
PHI3 = ChatTemplate(
    name="phi3", specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
    header={r: f"<|{r}|>\n" for r in ROLES}, suffix=_per_role("<|end|>\n"), end_of_turn="<|end|>",
    closing="<|endoftext|>",
)

# The BigBro repo's prompt: its system line, its user prefix, and each image's rows where its <|extra_0|> stood.
BIGBRO_SYSTEM = "你是一位图像理解助手。"
BIGBRO_USER_PREFIX = "用中文回答："
BIGBRO = dataclasses.replace(CHATML, name="bigbro", default_system=BIGBRO_SYSTEM, user_prefix=BIGBRO_USER_PREFIX,
                             image_delimiters=False)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (CHATML, LLAMA3, MISTRAL, GEMMA, PHI3, BIGBRO)}

# Not a layout of ours: the checkpoint's own Jinja template, rendered by dataset/hf_template.py (a tokenizer whose
# template detect_template does not recognise, e.g. LLaVA-1.5's "USER: <image>\n... ASSISTANT: ..."). The
# strings are empty: `ChatFormat.jinja` holds the text and rendering never reads them.
OWN = ChatTemplate(name="own", specials=(), header=_per_role(""), suffix=_per_role(""), end_of_turn="")

# A tokenizer's own Jinja template names its marker tokens; the first marker found decides.
_MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"),
            ("<|assistant|>", "phi3"), ("[INST]", "mistral"))
_BY_MODEL_TYPE = {"qwen": "chatml", "qwen2": "chatml", "qwen3": "chatml", "qwen2_moe": "chatml",
                  "qwen3_moe": "chatml", "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma",
                  "mistral": "mistral", "mixtral": "mistral", "phi3": "phi3"}


def detect_template(chat_template_text: str | None, model_type: str | None) -> str | None:
    if chat_template_text:
        for marker, name in _MARKERS:
            if marker in chat_template_text:
                return name
    return _BY_MODEL_TYPE.get(model_type or "")
