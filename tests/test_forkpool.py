"""Bulk input through forked worker processes: order, errors, clean exits.

The pool itself is exercised in-process; the `tokenize` command with inputs big
enough to take the pool is run as a real process and checked against sentencepiece.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO, SAMPLE_LINES, _clean_env

from toolbox.errors import ToolboxError
from toolbox.forkpool import BULK, ForkPool, ordered_map


def _pid_and_square(n: int) -> tuple[int, int]:
    return os.getpid(), n * n


def _fail_on_seven(n: int) -> int:
    if n == 7:
        raise ToolboxError(f"item {n} is bad")
    return n


def test_pool_keeps_order_and_uses_every_worker():
    with ForkPool(_pid_and_square, 3) as pool:
        results = list(pool.imap(range(40)))
    assert [square for _, square in results] == [n * n for n in range(40)]
    pids = {pid for pid, _ in results}
    assert len(pids) == 3 and os.getpid() not in pids


def test_pool_reraises_the_workers_exception_in_turn():
    seen = []
    with ForkPool(_fail_on_seven, 2) as pool, pytest.raises(ToolboxError, match="item 7 is bad"):
        for n in pool.imap(range(20)):
            seen.append(n)
    assert seen == list(range(7))  # everything before the bad item, nothing after


def test_closed_pool_leaves_no_processes():
    pool = ForkPool(_pid_and_square, 2)
    pids = {pid for pid, _ in pool.imap(range(4))}
    pool.close()
    for pid in pids:  # reaped: no zombie left behind
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


@pytest.mark.parametrize("first_size, forks", [(BULK, True), (BULK - 1, False)])
def test_ordered_map_forks_only_for_bulk_input(first_size, forks):
    items = iter([first_size, 1, 2, 3])
    results = list(ordered_map(_pid_and_square, items, processes=2, size=lambda n: n))
    assert [square for _, square in results] == [first_size**2, 1, 4, 9]
    assert (os.getpid() not in {pid for pid, _ in results}) == (forks and sys.platform != "darwin")


def test_ordered_map_single_process_stays_here():
    results = list(ordered_map(_pid_and_square, iter([10 * BULK, 5]), processes=1, size=lambda n: n))
    assert {pid for pid, _ in results} == {os.getpid()}


# -- tokenize on bulk input ---------------------------------------------------------


def _bulk_lines(min_bytes: int) -> list[str]:
    """Numbered copies of the sample lines, together at least `min_bytes` of UTF-8."""
    lines, size, i = [], 0, 0
    while size < min_bytes:
        line = f"{i}: {SAMPLE_LINES[i % len(SAMPLE_LINES)]}"
        lines.append(line)
        size += len(line.encode("utf-8")) + 1
        i += 1
    return lines


def _tokenize(*args, input: bytes, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "toolbox", "tokenize", *args],
        input=input, capture_output=True, env=_clean_env(), cwd=REPO, timeout=timeout,
    )


@pytest.fixture(scope="module")
def bulk():
    """About 1 MB: several blocks for each worker process."""
    return _bulk_lines(1 << 20)


@pytest.mark.parametrize("fmt", ["ids", "pieces"])
def test_bulk_tokenize_matches_sentencepiece(bulk, sp_ref, fmt):
    data = "".join(line + ("\r\n" if i % 3 == 0 else "\n") for i, line in enumerate(bulk)).encode("utf-8")
    p = _tokenize("--format", fmt, input=data)
    assert p.returncode == 0, p.stderr
    out_type = int if fmt == "ids" else str
    want = [" ".join(map(str, ids)) for ids in sp_ref.encode(bulk, out_type=out_type)]
    assert p.stdout.decode("utf-8").split("\n") == [*want, ""]


def test_bulk_json_and_unterminated_last_line(bulk, sp_ref):
    p = _tokenize("--json", input="\n".join(bulk).encode("utf-8"))
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.decode("utf-8").splitlines()]
    assert [r["ids"] for r in records] == sp_ref.encode(bulk)


def test_bulk_bad_line_keeps_every_line_before_it(bulk, sp_ref):
    bad = len(bulk) * 3 // 4  # well inside a later block, handled by some worker
    raw = [line.encode("utf-8") for line in bulk]
    raw[bad] = b"ok \xff then bad"
    p = _tokenize("--format", "ids", input=b"\n".join(raw) + b"\n")
    assert p.returncode == 1
    err = p.stderr.decode("utf-8")
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"Error: stdin line {bad + 1}: invalid UTF-8 (byte 0xff at byte offset 3); "
        "pass --errors replace to substitute U+FFFD"
    ]
    want = [" ".join(map(str, ids)) for ids in sp_ref.encode(bulk[:bad])]
    assert p.stdout.decode("utf-8").split("\n") == [*want, ""]


def _processes_with(marker: str) -> list[int]:
    """Pids of the processes whose environment holds `marker` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc to find the workers")
def test_bulk_output_closed_early_exits_quietly(bulk):
    """`toolbox tokenize < big | head -1`: no traceback, no worker process left behind."""
    marker = f"TOOLBOX_TEST_MARKER={os.getpid()}-closed-early"
    key, value = marker.split("=")
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolbox", "tokenize", "--format", "ids"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_clean_env(**{key: value}), cwd=REPO,
    )
    data = ("\n".join(bulk * 4) + "\n").encode("utf-8")

    def feed():
        try:
            proc.stdin.write(data)
            proc.stdin.close()
        except BrokenPipeError:
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        assert proc.stdout.readline()
        proc.stdout.close()  # the reader goes away, as `head -1` does
        proc.wait(timeout=30)
        assert "Traceback" not in proc.stderr.read().decode("utf-8")
        assert _processes_with(marker) == []
    finally:
        proc.kill()
        proc.wait()
