"""Incremental detokenisation with stop strings, for streamed answers.

Contract: `TextStream(decode, stops)`; `push(token_id) -> (delta, stopped)` appends one token and returns
the text that became final (possibly "") and whether a stop string appeared; `finish() -> delta` returns
what was held back. `text` is the answer so far: `decode(all tokens)`, cut before the first stop string.
The concatenation of every delta equals the final `text`.

Held back until the next token: text ending in U+FFFD (an incomplete multi-byte character) and any tail
that could be the beginning of a stop string (so a stop string is never half-sent).

Decoding is incremental (constant work per token, where decoding every token again grew with the answer):
each push decodes only the tokens since the last complete text plus the one token before them (the
prefix), and appends the difference. The prefix token keeps a tokenizer's context, e.g. SentencePiece's
leading space, which a token decoded alone would lose.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | None = None) -> None:
        self.decode = decode
        self.stops = [s for s in (stops or []) if s]
        self.ids: list[int] = []
        self.done = ""  # decode(ids[:read]): the text of every token up to the last complete character
        self.prefix = 0  # ids[prefix:read] is decoded again as context for the new tokens
        self.read = 0
        self.text = ""
        self.sent = 0  # characters of `text` already returned as deltas
        self.stopped = False

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that starts a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        text = self._extend()
        if self.stops:
            # Only the region that the new token could have changed is searched (plus a stop's length).
            start = max(0, self.sent - max(len(s) for s in self.stops))
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = text[:min(hits)], True
                return self._take(len(self.text)), True
        self.text = text
        if text.endswith("\ufffd"):
            return "", False
        return self._take(len(text) - self._held(text)), False

    def _extend(self) -> str:
        """The text of every token so far. The offsets move on once it has grown and ends in a complete
        character (a token with no text of its own keeps the earlier context in the window)."""
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if now.startswith(before):
            text = self.done + now[len(before):]
        else:  # the new token changed the text before it (a tokenizer's clean-up): decode everything
            text = self.decode(self.ids)
        if len(text) > len(self.done) and not text.endswith("\ufffd"):
            self.done, self.prefix, self.read = text, self.read, len(self.ids)
        return text

    def _take(self, upto: int) -> str:
        delta = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta

    def finish(self) -> str:
        return self._take(len(self.text))
