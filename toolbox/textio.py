"""Line-oriented stdin/stdout helpers shared by the text-processing commands.

Input is read in chunks with `read1`, which returns whatever a pipe holds without
waiting for the chunk to fill: a file is processed in large batches, while
`tail -f log | toolbox tokenize` still answers each line as it arrives.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import BinaryIO, TypeVar

from toolbox.errors import ToolboxError

CHUNK = 1 << 20
T = TypeVar("T")
_END = object()


def decode_line(raw: bytes, lineno: int, errors: str, source: str = "stdin") -> str:
    """Decode one line of UTF-8, raising a one-line error that names the line and byte."""
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        raise ToolboxError(
            f"{source} line {lineno}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
            f"offset {exc.start}); pass --errors replace to substitute U+FFFD"
        ) from None


def _strip_eol(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def iter_line_batches(
    stream: BinaryIO, errors: str = "strict", source: str = "stdin"
) -> Iterator[list[tuple[int, str]]]:
    """Yield batches of (line number, text) as input arrives; line ends (LF, CRLF) removed."""
    read = getattr(stream, "read1", stream.read)
    pending = b""
    lineno = 0
    while True:
        chunk = read(CHUNK)
        if not chunk:
            break
        pending += chunk
        cut = pending.rfind(b"\n")
        if cut < 0:
            continue
        complete, pending = pending[: cut + 1], pending[cut + 1 :]
        batch = []
        for raw in complete.split(b"\n")[:-1]:
            lineno += 1
            try:
                batch.append((lineno, decode_line(_strip_eol(raw), lineno, errors, source)))
            except ToolboxError:
                if batch:  # hand over the good lines before the bad one
                    yield batch
                raise
        yield batch
    if pending:
        lineno += 1
        yield [(lineno, decode_line(_strip_eol(pending), lineno, errors, source))]


def read_whole(stream: BinaryIO, errors: str = "strict", source: str = "stdin") -> str:
    """Read all of a stream as one text, kept byte for byte (line ends included)."""
    data = stream.read()
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        raise ToolboxError(
            f"{source} line {lineno}: invalid UTF-8 (byte 0x{data[exc.start]:02x} at byte "
            f"offset {exc.start - line_start}); pass --errors replace to substitute U+FFFD"
        ) from None


class Output:
    """UTF-8 output to stdout whatever the locale, flushed after every batch."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def write_lines(self, lines: list[str]) -> None:
        if lines:
            self._stream.write(("\n".join(lines) + "\n").encode("utf-8"))
            self._stream.flush()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items`, produced in a background thread up to `depth` ahead; its errors re-raise here."""
    ready: queue.Queue = queue.Queue(depth)

    def produce():
        try:
            for item in items:
                ready.put((item, None))
            ready.put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised in its thread
            ready.put((_END, exc))

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item, error = ready.get()
        if item is _END:
            if error is not None:
                raise error
            return
        yield item
