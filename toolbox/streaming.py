"""Incremental detokenization for streamed generation.

Tokens are turned into text as they arrive. Only what cannot be shown yet is held
back: an incomplete UTF-8 byte run (a character split over `<0xNN>` pieces), the
start of a stop string, or (under the `<NL>` convention) the start of `<NL>`.
Japanese therefore appears character by character, unlike transformers'
TextStreamer, which waits for a word boundary.
"""

from __future__ import annotations

import codecs

from toolbox.prompts import NL


class TextAssembler:
    """Text deltas of one generated sequence, with stop strings cut exactly."""

    def __init__(self, token_bytes: list[bytes], stop: tuple[str, ...] = (), nl: bool = False):
        self._bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = tuple(s for s in stop if s)
        self._nl = nl
        self._watch = (*self._stop, NL) if nl else self._stop
        self._pending = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        raw = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""  # an id the tokenizer lacks
        self._pending += self._decoder.decode(raw)
        return self._release(final=False)

    def step(self, token_id: int, finish_reason: str | None) -> tuple[str, str | None]:
        """Add the token a sequence produced, with the backend's finish reason for it.

        Returns the text that became final and the sequence's finish reason: "stop" when
        a stop string appeared (the caller must then cancel the sequence), else the
        backend's reason, with everything held back flushed once the sequence ends.
        """
        delta = self.push(token_id)
        if self.stopped:
            return delta, "stop"
        if finish_reason is not None:
            delta += self.finish()
        return delta, finish_reason

    def finish(self) -> str:
        """Flush what is held back (the sequence ended for another reason)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        pending = self._pending.replace(NL, "\n") if self._nl else self._pending
        cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = pending[:cut], ""
        else:
            keep = 0 if final else _held_suffix(pending, self._watch)
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out


def _held_suffix(text: str, watch: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into one of `watch`."""
    best = 0
    for s in watch:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
