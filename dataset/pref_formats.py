"""Preference records in the layouts in use, read unmodified, normalised to one `PrefPair`.

`normalize_pair(record, position, source, image_folder=None, allow_absolute_paths=False) -> PrefPair`
accepts (detected from the keys, first match wins):
- LLaVA-RLHF: `conversations` (the prompt, ending with the question), `output_1`, `output_2` (a message
  object `{"from", "value"}` or a string), `preference` (1 or 2: the chosen output), `image`.
- LLaMA-Factory, messages layout: `chosen_messages` / `rejected_messages`, each a whole conversation (the
  shared prompt, then the answer), or each only the answer when `conversations` / `messages` holds the prompt;
  `images`.
- ms-swift: `messages` (the prompt and the chosen answer last) + `rejected_response` (a string) or
  `rejected_messages` (the whole rejected conversation); `images`.
- RLAIF-V: `image`, `question`, `chosen`, `rejected` (strings).
- trl: `prompt`, `chosen`, `rejected`, `images`; the prompt is a string or a message list, the answers are
  strings or message lists (one assistant message), content as a string or as blocks (`{"type": "text"}`,
  `{"type": "image"}` = the next of `images`).
- LLaMA-Factory sharegpt pairs: `conversations` (or `messages`) + `chosen` / `rejected` message objects
  (`{"from", "value"}` / `{"role", "content"}`); `images`.
`PrefPair(id, prompt, images, chosen, rejected, source)`: `prompt` is a valid conversation ending with a user
turn (dataset/formats.py's rules: roles, order, one `<image>` per image, paths resolved; a prompt with images
and no marker gets them before the first question, the LLaVA convention), `chosen` / `rejected` the two answers.

Every bad record raises `BadSampleError` with one line naming the file, the line (JSONL) or index (JSON), the
id and the reason: missing chosen or rejected, chosen == rejected, image markers != images, prompts that
differ between the two sides, `preference` not 1 or 2, an answer holding an image marker.
`read_pairs(path, image_folder=None, ...) -> (pairs, skipped)`: every record of a file, the bad ones skipped
and returned as `(position, BadSampleError)`; never raises for a bad row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .formats import normalize, read_records
from .sample import IMAGE_MARKER, VIDEO_MARKER, BadSampleError, Sample, describe_source

LAYOUTS = ("llava_rlhf", "lf_messages", "swift", "rlaif_v", "trl", "lf_sharegpt")


@dataclass
class PrefPair:
    id: str
    prompt: list[dict[str, str]]  # ends with a user turn
    images: list[str]  # resolved paths, one per <image> marker in the prompt
    chosen: str
    rejected: str
    source: tuple[str, int] | None = None
    layout: str = ""

    def sample(self, answer: str) -> Sample:
        """The conversation prompt + `answer` as a `Sample` (rendering's input)."""
        return Sample(self.id, [*self.prompt, {"role": "assistant", "content": answer}], list(self.images),
                      source=self.source)


def detect_layout(record: dict) -> str | None:
    if "preference" in record or "output_1" in record:
        return "llava_rlhf"
    if "chosen_messages" in record:
        return "lf_messages"
    if "rejected_response" in record or ("rejected_messages" in record and "messages" in record):
        return "swift"
    if "question" in record:
        return "rlaif_v"
    if "prompt" in record:
        return "trl"
    if "conversations" in record or "messages" in record:
        return "lf_sharegpt"
    return None


def _text(value: Any, what: str, fail) -> str:
    """An answer given as a string, a message object or a list of one assistant message."""
    if isinstance(value, list):
        if len(value) != 1:
            raise fail(f"'{what}' must hold one assistant message, got {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if isinstance(value, list):  # content blocks: text only in an answer
        if not all(isinstance(b, dict) and b.get("type") == "text" for b in value):
            raise fail(f"'{what}' content blocks must all be text")
        value = "".join(b.get("text", "") for b in value)
    if not isinstance(value, str):
        raise fail(f"'{what}' must be a string or a message with text content, got {type(value).__name__}")
    return value


def _blocks_to_text(messages: list) -> list:
    """trl's content blocks: `{"type": "image"}` (no path: the next of `images`) -> the marker."""
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = []
            for b in m["content"]:
                kind = b.get("type") if isinstance(b, dict) else None
                parts.append(IMAGE_MARKER if kind == "image" and not b.get("image") else
                             b.get("text", "") if kind == "text" else b)
            if all(isinstance(p, str) for p in parts):
                m = {**m, "content": "".join(parts)}
        out.append(m)
    return out


def _split_conversation(msgs: Any, what: str, fail) -> tuple[list, str]:
    """A whole conversation -> (its prompt messages, its final assistant answer)."""
    if not isinstance(msgs, list) or not msgs:
        raise fail(f"'{what}' must be a non-empty list of messages")
    last = msgs[-1]
    role = last.get("role", last.get("from")) if isinstance(last, dict) else None
    if role not in ("assistant", "gpt"):
        raise fail(f"'{what}' must end with the assistant's answer, ends with role {role!r}")
    return msgs[:-1], _text(last, what, fail)


def _sides(record: dict, layout: str, fail) -> tuple[list, str, str]:
    """(prompt messages as written, chosen text, rejected text) for a detected layout."""
    shared = record.get("conversations", record.get("messages"))
    if layout == "llava_rlhf":
        pref = record.get("preference")
        if pref not in (1, 2, "1", "2"):
            raise fail(f"'preference' must be 1 or 2 (the chosen output), got {pref!r}")
        for k in ("output_1", "output_2"):
            if record.get(k) in (None, ""):
                raise fail(f"missing chosen or rejected: no '{k}'")
        first, second = _text(record["output_1"], "output_1", fail), _text(record["output_2"], "output_2", fail)
        return shared, *((first, second) if int(pref) == 1 else (second, first))
    if layout == "lf_messages" or (layout == "swift" and "rejected_messages" in record):
        ckey = "chosen_messages" if layout == "lf_messages" else "messages"
        if record.get(ckey) in (None, []) or record.get("rejected_messages") in (None, []):
            raise fail(f"missing chosen or rejected: '{ckey}' and 'rejected_messages' are both needed")
        if layout == "lf_messages" and shared is not None and len(record[ckey]) == 1:
            return shared, _text(record[ckey], ckey, fail), _text(record["rejected_messages"], "rejected_messages", fail)
        p_c, chosen = _split_conversation(record[ckey], ckey, fail)
        p_r, rejected = _split_conversation(record["rejected_messages"], "rejected_messages", fail)
        if _canon(p_c) != _canon(p_r):
            raise fail(f"the prompts differ between '{ckey}' and 'rejected_messages' (a pair shares its prompt)")
        return p_c, chosen, rejected
    if layout == "swift":
        prompt, chosen = _split_conversation(record.get("messages"), "messages", fail)
        return prompt, chosen, _need(record, "rejected_response", fail)
    if layout == "rlaif_v":
        q = record.get("question")
        if not isinstance(q, str) or not q:
            raise fail("'question' must be a non-empty string")
        return [{"role": "user", "content": q}], _need(record, "chosen", fail), _need(record, "rejected", fail)
    if layout == "trl":
        p = record["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _blocks_to_text(p)
        return prompt, _need(record, "chosen", fail), _need(record, "rejected", fail)
    return shared, _need(record, "chosen", fail), _need(record, "rejected", fail)


def _need(record: dict, key: str, fail) -> str:
    if record.get(key) in (None, "", [], {}):
        raise fail(f"missing chosen or rejected: no '{key}'")
    return _text(record[key], key, fail)


def _canon(msgs: list) -> list:
    """Messages compared by role and content whatever their spelling (`from`/`value` or `role`/`content`)."""
    out = []
    for m in msgs:
        if isinstance(m, dict):
            out.append((m.get("role", m.get("from")), m.get("content", m.get("value"))))
        else:
            out.append(m)
    return out


def normalize_pair(record: Any, position: int = 0, source: str = "<memory>", *, image_folder: str | None = None,
                   allow_absolute_paths: bool = False) -> PrefPair:
    """One preference record of any supported layout -> `PrefPair` (see the module docstring)."""
    where = (str(source), position)
    if not isinstance(record, dict):
        raise BadSampleError(f"{describe_source(where)}: record must be a JSON object, got {type(record).__name__}")
    sid = next((str(record[k]) for k in ("id", "idx") if record.get(k) is not None),
               f"{os.path.basename(str(source))}#{position}")

    def fail(msg: str) -> BadSampleError:
        return BadSampleError(f"{describe_source(where)} (id {sid!r}): {msg}")

    layout = detect_layout(record)
    if layout is None:
        raise fail("not a preference record: expected chosen/rejected (LLaMA-Factory, trl, RLAIF-V), "
                   "rejected_response (ms-swift) or output_1/output_2/preference (LLaVA-RLHF)")
    prompt, chosen, rejected = _sides(record, layout, fail)
    if not isinstance(prompt, list) or not prompt:
        raise fail("no prompt: expected a non-empty 'conversations' / 'messages' / 'prompt'")
    if chosen == rejected:
        raise fail("chosen == rejected (the pair teaches nothing)")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if IMAGE_MARKER in answer or VIDEO_MARKER in answer:
            raise fail(f"the {name} answer holds an image/video marker; images belong to the prompt")
    images = record.get("images", record.get("image"))
    # formats.normalize checks roles, order, markers against images and resolves the paths (its errors already
    # name the file, position and id); the chosen side stands for both, the prompts being one.
    probe = {"id": sid, "conversations": [*prompt, {"from": "gpt", "value": chosen}]}
    if images not in (None, "", []):
        probe["images"] = images
    if record.get("system") not in (None, ""):
        probe["system"] = record["system"]
    s = normalize(probe, position, source, image_folder=image_folder, allow_absolute_paths=allow_absolute_paths)
    if s.videos:
        raise fail("videos are not supported in preference pairs")
    return PrefPair(sid, s.messages[:-1], s.images, chosen, rejected, where, layout)


def read_pairs(path: str, image_folder: str | None = None, allow_absolute_paths: bool = False
               ) -> tuple[list[PrefPair], list[tuple[int, BadSampleError]]]:
    """Every usable pair of a `.json` / `.jsonl` file, and the skipped rows with their errors."""
    skipped: list[tuple[int, BadSampleError]] = []
    records = read_records(path, bad_lines=skipped)
    pairs = []
    for pos, rec in records:
        try:
            pairs.append(normalize_pair(rec, pos, path, image_folder=image_folder,
                                        allow_absolute_paths=allow_absolute_paths))
        except BadSampleError as e:
            skipped.append((pos, e))
    return pairs, skipped
