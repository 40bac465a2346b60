"""Incremental detokenization with stop strings.

Stop strings are matched on text, never on tokens, and text is only released once it is
final: a trailing U+FFFD (an incomplete multi-byte character) and any suffix that could
still grow into a stop string are held back until the next tokens decide them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Pushed:
    text: str  # newly final text
    num_tokens: int  # how many of the pushed tokens were kept
    stopped: bool  # a stop string matched; the kept tokens end with the one completing it


class TextStream:
    """Decodes incrementally: a decode costs time linear in the tokens it decodes, so
    decoding the whole output every step would grow with the text (~0.5 ms a step at
    2,000 tokens for SmolLM2's tokenizer). Text up to `_read` tokens is final (it ended
    on a complete character); each decode covers only the tokens from `_prefix` (the
    previous final point, a few tokens back) on, and keeps what it adds after the
    decoded text of `_prefix.._read`, which tokenizers that treat a text's first token
    specially (a leading-space marker) decode the same way in both windows.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.released = 0  # characters of the decoded text already returned
        self.text = ""
        self._final = ""  # decoded text of ids[:_read]
        self._prefix = self._read = 0
        self._prefix_text = ""  # decoded text of ids[_prefix:_read]

    def _decode(self) -> str:
        decode = self.tokenizer.decode
        window = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if window.startswith(self._prefix_text):
            text = self._final + window[len(self._prefix_text):]
        else:  # the window decoded its first tokens differently: decode everything
            text = decode(self.ids, skip_special_tokens=True)
        if text and not text.endswith("\ufffd") and len(self.ids) > self._read:
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = decode(self.ids[self._prefix:], skip_special_tokens=True)
            self._final = text
        return text

    def push(self, token_ids: Sequence[int]) -> Pushed:
        """Add tokens one at a time so a stop string ends generation at the same token
        that plain decoding would stop at (without stop strings: one decode per push)."""
        start = len(self.ids)
        if not self.stop:
            self.ids.extend(token_ids)
            if token_ids:
                self.text = self._decode()
        for i, tok in enumerate(token_ids if self.stop else ()):
            self.ids.append(tok)
            text = self._decode()
            hit = self._find_stop(text)
            if hit is not None:
                self.text = text[:hit]
                out = self.text[self.released :]
                self.released = len(self.text)
                return Pushed(out, i + 1, True)
            self.text = text
        safe = self._safe_end(self.text)
        out = self.text[self.released : safe] if safe > self.released else ""
        self.released = max(self.released, safe)
        return Pushed(out, len(self.ids) - start, False)

    def flush(self) -> str:
        """Everything not yet released (at the end of generation)."""
        out = self.text[self.released :]
        self.released = len(self.text)
        return out

    def _find_stop(self, text: str) -> int | None:
        # Only text that is not yet released can contain a new match.
        lo = max(0, self.released - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := text.find(s, lo)) >= 0]
        return min(hits) if hits else None

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.released and text[end - 1] == "\ufffd":
            end -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.released), 0, -1):
                if text[end - k : end] == s[:k]:
                    end -= k
                    break
        return end


def eos_token_ids(*sources) -> set[int]:
    """End-of-sequence ids named by any of `sources` (generation configs, model configs,
    tokenizers: their `eos_token_id`, one id or a list; None sources are skipped)."""
    ids: set[int] = set()
    for src in sources:
        eos = getattr(src, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids
