"""Batch generation over a JSONL file: records in, one result record each out, resumable.

Shared by `toolbox generate --input/--output` and the Ray batch job, so that both write
the same records for the same input and seed. A result record is
``{"index", "id" (when the input has one), "prompt", "prompt_tokens", <the sample's
fields>}`` (n = 1) or ``{..., "samples": [...]}``; `index` is the input line, 0-based.
A rerun skips the indices already in the output; a torn last line (a crash mid-write)
is cut off first, so appending never glues a record onto half of another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from toolbox.errors import ToolboxError


@dataclass(frozen=True)
class InputRecord:
    """One valid input record: its line index, the record itself and its prompt text."""

    index: int
    record: dict
    prompt: str


def check_output(output: Path) -> None:
    """An output file that can be appended to (its directory exists and is writable)."""
    parent = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise ToolboxError(f"--output {output}: is a directory")
    if not parent.is_dir():
        raise ToolboxError(f"--output {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise ToolboxError(f"--output {output}: not writable")


def repair_tail(output: Path) -> bool:
    """Cut a torn last line (no final newline) off `output`; True when something was cut."""
    if not output.is_file() or output.stat().st_size == 0:
        return False
    with output.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        size = f.seek(0, os.SEEK_END)
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return True
            pos = start
        f.truncate(0)
        return True


def done_indices(output: Path) -> set[int]:
    """Indices of the records an earlier run wrote."""
    done = set()
    if output.exists():
        with output.open("rb") as f:
            for line in f:
                try:
                    done.add(int(json.loads(line)["index"]))
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def read_records(path: Path, field: str, skip: set[int], failures: list[str]) -> Iterator[InputRecord]:
    """The valid records of `path` not in `skip`; a bad one adds a line naming it to `failures`."""
    with path.open("rb") as f:
        yield from parse_lines(f, path.name, field, skip, failures)


def parse_lines(lines: Iterable[bytes], name: str, field: str, skip: set[int],
                failures: list[str]) -> Iterator[InputRecord]:
    """`read_records` over the lines of a file called `name` that is already open (or in memory)."""
    for index, raw in enumerate(lines):
        if index in skip or not raw.strip():
            continue
        where = f"{name} line {index + 1}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            failures.append(f"{where}: invalid UTF-8 at byte {exc.start}")
            continue
        except json.JSONDecodeError as exc:
            failures.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            failures.append(f"{where}: expected a JSON object")
            continue
        text = record.get(field)
        if not isinstance(text, str):
            failures.append(f"{where}: field {field!r} missing or not a string")
            continue
        if not text:
            failures.append(f"{where}: field {field!r} is empty")
            continue
        yield InputRecord(index, record, text)


def count_todo(path: Path, skip: set[int]) -> int:
    with path.open("rb") as f:
        return sum(1 for i, line in enumerate(f) if i not in skip and line.strip())


def result_record(item: InputRecord, completion) -> dict:
    """The output record of one input record (see the module docstring)."""
    samples = [sample_fields(s, completion.started) for s in completion.samples]
    head = {"index": item.index, **({"id": item.record["id"]} if "id" in item.record else {}),
            "prompt": item.prompt, "prompt_tokens": len(completion.prompt_ids)}
    return {**head, **(samples[0] if len(samples) == 1 else {"samples": samples})}


def sample_fields(sample, started: float) -> dict:
    """A finished sample as JSON fields: text, ids, logprobs, finish reason, timings."""
    fields = {
        "text": sample.text,
        "token_ids": sample.token_ids,
        "logprobs": [round(lp, 6) for lp in sample.logprobs],
        "finish_reason": sample.finish_reason,
        "completion_tokens": len(sample.token_ids),
        "timings": sample.timings(started),
    }
    if sample.error is not None:
        fields["error"] = sample.error
    return fields
