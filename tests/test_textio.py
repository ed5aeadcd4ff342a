"""Line splitting and decoding of raw input, against a line-by-line reading done here."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st

from toolbox.errors import ToolboxError
from toolbox.textio import decode_block, iter_line_batches, iter_line_blocks

# Input built from the pieces that matter: text, both line ends, lone CRs, bad bytes.
FRAGMENTS = st.sampled_from([b"a", "猫".encode(), "🍣".encode(), b"\n", b"\r\n", b"\r", b"\xff", b"\xe7\x8c", b" "])
RAW = st.lists(FRAGMENTS, max_size=40).map(b"".join)


def reference_lines(raw: bytes) -> list[bytes]:
    """Lines split at LF, one CR before the LF dropped, and a CR ending the input dropped."""
    lines = raw.split(b"\n")
    if raw.endswith(b"\n") or not raw:
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


@given(RAW)
def test_decode_block_with_replacement_matches_line_by_line(raw):
    lines, error = decode_block(1, raw, "replace")
    assert error is None
    assert lines == [line.decode("utf-8", "replace") for line in reference_lines(raw)]


@given(RAW, st.integers(1, 1000))
def test_decode_block_stops_at_the_first_bad_line(raw, first):
    lines, error = decode_block(first, raw)
    expected = []
    for i, line in enumerate(reference_lines(raw)):
        try:
            expected.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            assert isinstance(error, ToolboxError)
            assert str(error).startswith(f"stdin line {first + i}: invalid UTF-8 (byte "
                                            f"0x{line[exc.start]:02x} at byte offset {exc.start})")
            break
    else:
        assert error is None
    assert lines == expected


@given(RAW, st.integers(1, 8))
def test_blocks_cover_the_input_in_whole_lines(raw, size):
    blocks = list(iter_line_blocks(io.BytesIO(raw), size))
    assert b"".join(block for _, block in blocks) == raw
    assert all(block.endswith(b"\n") for _, block in blocks[:-1])
    assert [first for first, _ in blocks] == [1 + raw[: sum(len(b) for _, b in blocks[:i])].count(b"\n")
                                              for i in range(len(blocks))]


def test_line_batches_number_lines_across_blocks():
    raw = "一\n二\r\n\n四".encode()
    batches = list(iter_line_batches(io.BytesIO(raw)))
    assert [pair for batch in batches for pair in batch] == [(1, "一"), (2, "二"), (3, ""), (4, "四")]
