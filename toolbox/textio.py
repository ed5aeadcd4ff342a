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
        raise _utf8_error(raw, exc, lineno, source) from None


def _utf8_error(data: bytes, exc: UnicodeDecodeError, first_line: int, source: str) -> ToolboxError:
    """The error for invalid UTF-8 in `data` (whose first line is number `first_line`)."""
    lineno = first_line + data.count(b"\n", 0, exc.start)
    offset = exc.start - (data.rfind(b"\n", 0, exc.start) + 1)
    return ToolboxError(
        f"{source} line {lineno}: invalid UTF-8 (byte 0x{data[exc.start]:02x} at byte "
        f"offset {offset}); pass --errors replace to substitute U+FFFD"
    )


def iter_line_blocks(stream: BinaryIO, size: int = CHUNK) -> Iterator[tuple[int, bytes]]:
    """Yield (number of its first line, bytes of whole lines) as input arrives.

    Every block ends with a line end except perhaps the last, the input's unterminated tail.
    """
    read = getattr(stream, "read1", stream.read)
    pending = b""
    next_line = 1
    while True:
        chunk = read(size)
        if not chunk:
            break
        pending += chunk
        cut = pending.rfind(b"\n")
        if cut < 0:
            continue
        block, pending = pending[: cut + 1], pending[cut + 1 :]
        yield next_line, block
        next_line += block.count(b"\n")
    if pending:
        yield next_line, pending


def decode_block(
    first_line: int, block: bytes, errors: str = "strict", source: str = "stdin"
) -> tuple[list[str], ToolboxError | None]:
    """The lines of a block as text, line ends (LF, CRLF) removed, up to the first bad line.

    Line i of the result is input line `first_line + i`. The error for the bad line,
    if any, comes second, so that the good lines before it can still be written out.
    """
    error = None
    try:
        text = block.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        error = _utf8_error(block, exc, first_line, source)
        text = block[: block.rfind(b"\n", 0, exc.start) + 1].decode("utf-8")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if not lines[-1]:  # what follows the last line end (or an empty block)
        lines.pop()
    elif lines[-1].endswith("\r"):  # an unterminated last line ending in CR
        lines[-1] = lines[-1][:-1]
    return lines, error


def iter_line_batches(
    stream: BinaryIO, errors: str = "strict", source: str = "stdin"
) -> Iterator[list[tuple[int, str]]]:
    """Yield batches of (line number, text) as input arrives; line ends (LF, CRLF) removed."""
    for first_line, block in iter_line_blocks(stream):
        lines, error = decode_block(first_line, block, errors, source)
        batch = list(enumerate(lines, first_line))
        if batch:  # the good lines go out before a bad one stops the input
            yield batch
        if error is not None:
            raise error


def read_whole(stream: BinaryIO, errors: str = "strict", source: str = "stdin") -> str:
    """Read all of a stream as one text, kept byte for byte (line ends included)."""
    data = stream.read()
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        raise _utf8_error(data, exc, 1, source) from None


class Output:
    """UTF-8 output to stdout whatever the locale, flushed after every batch."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def write_lines(self, lines: list[str]) -> None:
        self.write(encode_lines(lines))

    def write(self, data: bytes) -> None:
        if data:
            self._stream.write(data)
            self._stream.flush()


def encode_lines(lines: list[str]) -> bytes:
    """Lines as UTF-8, each ended by a newline."""
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items`, produced in a background thread up to `depth` ahead; its errors re-raise here."""
    ready: queue.Queue = queue.Queue(depth)

    def produce():
        try:
            for item in items:
                ready.put((item, None))
            ready.put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised in its thread
            ready.put((_END, exc))

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item, error = ready.get()
        if item is _END:
            if error is not None:
                raise error
            return
        yield item
