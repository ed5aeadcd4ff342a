"""Byte-fallback analysis: which characters the vocabulary covers and which become `<0xNN>` pieces."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from toolbox.tokenizer import Token, Tokenizer

PIECE, FALLBACK, SPECIAL, UNKNOWN = "piece", "byte-fallback", "special", "unknown"


def char_name(ch: str) -> str:
    """Unicode name, or the general category for unnamed characters such as controls."""
    return unicodedata.name(ch, "") or f"<{unicodedata.category(ch)}>"


@dataclass
class Segment:
    """A run of input characters and the tokens that encode it."""

    text: str
    start: int
    end: int
    kind: str
    ids: list[int]
    pieces: list[str]
    normalized: str | None = None  # what the model saw, where normalization changed the text

    @property
    def characters(self) -> list[dict]:
        """Code point and Unicode name of each character (for byte-fallback runs)."""
        return [
            {"char": ch, "codepoint": f"U+{ord(ch):04X}", "name": char_name(ch)} for ch in self.text
        ]

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.kind == FALLBACK:
            data["characters"] = self.characters
        return data


@dataclass
class Inspection:
    """Segments of one text with coverage figures."""

    text: str
    segments: list[Segment]
    roundtrip: bool
    counts: Counter = field(default_factory=Counter)  # characters per segment kind

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.segments)

    @property
    def characters(self) -> int:
        return len(self.text)

    def summary(self) -> dict:
        return {
            **_coverage(self.characters, self.tokens, self.counts),
            "normalized_segments": sum(1 for s in self.segments if s.normalized is not None),
            "roundtrip": self.roundtrip,
        }

    def to_dict(self) -> dict:
        return {"text": self.text, "segments": [s.to_dict() for s in self.segments], "summary": self.summary()}


def segments(tok: Tokenizer, text: str, tokens: list[Token]) -> Iterable[Segment]:
    """Group tokens into segments: each `<0xNN>` run under the character it encodes."""
    run: list[Token] = []
    for t in tokens:
        if tok.is_byte(t.id):
            run.append(t)
            if t.end > t.start:  # sentencepiece gives the character's span to its last byte
                yield _fallback_segment(text, run)
                run = []
            continue
        surface = text[t.start : t.end]
        if tok.is_special(t.id):
            kind = UNKNOWN if t.id == tok.special_ids.get("unk") else SPECIAL
            yield Segment(surface, t.start, t.end, kind, [t.id], [t.piece])
            continue
        seen = t.piece.replace("▁", " ")
        yield Segment(surface, t.start, t.end, PIECE, [t.id], [t.piece], None if seen == surface else seen)
    if run:
        yield _fallback_segment(text, run)


def _fallback_segment(text: str, run: list[Token]) -> Segment:
    start, end = run[0].start, run[-1].end
    surface = text[start:end]
    seen = bytes(int(t.piece[3:5], 16) for t in run).decode("utf-8", "replace")
    return Segment(
        surface, start, end, FALLBACK, [t.id for t in run], [t.piece for t in run],
        None if seen == surface else seen,
    )


def inspect_text(tok: Tokenizer, text: str) -> Inspection:
    """Segments, coverage counts and round-trip check for `text`."""
    tokens = tok.tokens(text)
    segs = list(segments(tok, text, tokens))
    counts: Counter = Counter()
    for s in segs:
        counts[s.kind] += len(s.text)
    roundtrip = tok.decode([t.id for t in tokens]) == text
    return Inspection(text, segs, roundtrip, counts)


@dataclass
class CorpusSummary:
    """Fallback statistics over many lines."""

    lines: int = 0
    characters: int = 0
    tokens: int = 0
    counts: Counter = field(default_factory=Counter)
    fallback_chars: Counter = field(default_factory=Counter)
    roundtrip_failures: int = 0

    def add(self, inspection: Inspection) -> None:
        self.lines += 1
        self.characters += inspection.characters
        self.tokens += inspection.tokens
        self.counts.update(inspection.counts)
        self.roundtrip_failures += not inspection.roundtrip
        for s in inspection.segments:
            if s.kind == FALLBACK:
                self.fallback_chars.update(s.text)

    def to_dict(self, top: int) -> dict:
        return {
            "lines": self.lines,
            **_coverage(self.characters, self.tokens, self.counts),
            "roundtrip_failures": self.roundtrip_failures,
            "top_fallback": [
                {"char": ch, "codepoint": f"U+{ord(ch):04X}", "name": char_name(ch), "count": n}
                for ch, n in self.fallback_chars.most_common(top)
            ],
        }


def _coverage(chars: int, tokens: int, counts: Counter) -> dict:
    return {
        "characters": chars,
        "tokens": tokens,
        "tokens_per_character": round(tokens / chars, 4) if chars else 0.0,
        "vocabulary_characters": counts[PIECE],
        "byte_fallback_characters": counts[FALLBACK],
        "unknown_characters": counts[UNKNOWN],
        "fallback_rate": round(counts[FALLBACK] / chars, 6) if chars else 0.0,
    }
