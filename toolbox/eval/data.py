"""Evaluation data: records from JSONL / CSV / Parquet files or a Hugging Face dataset.

Every record carries where it came from (file and line, or dataset and row), so a missing
field, an empty reference or an unreadable line is a one-line error that names it. With
`skip_invalid` such records are counted and reported instead; never is a run silently
shorter than its data.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import ToolboxError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


@dataclass
class Record:
    """One record of the data: its position in the source, where to point the user, its fields."""

    index: int
    where: str
    fields: dict[str, Any]


@dataclass
class Loaded:
    """The items a run uses, and what was left out on the way."""

    label: str  # the file or dataset, for the report
    items: list
    total: int  # records in the source
    invalid: int = 0
    skipped: list[str] = field(default_factory=list)  # messages of invalid records (with --skip-invalid)


def _bad(message: str):
    """A record that could not be read: carried as its error message until validation."""
    return ToolboxError(message)


def _jsonl(path: Path) -> Iterator[Record | ToolboxError]:
    index = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield _bad(f"{where}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})")
                index += 1
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield _bad(f"{where}: not JSON ({exc.msg} at column {exc.colno})")
                index += 1
                continue
            if not isinstance(value, dict):
                yield _bad(f"{where}: expected a JSON object, got {type(value).__name__}")
            else:
                yield Record(index, where, value)
            index += 1


def _csv(path: Path, delimiter: str) -> Iterator[Record | ToolboxError]:
    try:
        f = path.open(encoding="utf-8-sig", newline="")
        with f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise ToolboxError(f"{path}: empty file (expected a header line)")
            index = 0
            start = reader.line_num + 1
            for row in reader:
                where = f"{path} line {start}"
                start = reader.line_num + 1
                if not row:
                    continue
                if len(row) != len(header):
                    yield _bad(f"{where}: {len(row)} columns, the header has {len(header)}")
                else:
                    yield Record(index, where, dict(zip(header, row)))
                index += 1
    except UnicodeDecodeError as exc:
        raise ToolboxError(f"{path}: invalid UTF-8 (byte 0x{exc.object[exc.start]:02x})") from None
    except csv.Error as exc:
        raise ToolboxError(f"{path}: unreadable CSV ({exc})") from None


def _parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ToolboxError("reading Parquet needs pyarrow: pip install 'rinna-toolbox[eval]'") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ToolboxError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    for i, row in enumerate(rows):
        yield Record(i, f"{path} row {i + 1}", row)


def read_file(path: str | Path) -> Iterator[Record | ToolboxError]:
    """Records of a local file (errors for unreadable ones are yielded, not raised)."""
    path = Path(path)
    if not path.is_file():
        raise ToolboxError(f"{path}: no such file")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ToolboxError(f"{path}: unknown data format {path.suffix or '(no extension)'!r} "
                           "(expected .jsonl, .csv, .tsv or .parquet)")
    if kind == "jsonl":
        return _jsonl(path)
    if kind in ("csv", "tsv"):
        return _csv(path, "," if kind == "csv" else "\t")
    return _parquet(path)


def read_dataset(spec: str, split: str) -> Iterator[Record]:
    """Records of a Hugging Face dataset `name[:config]` (or a local dataset directory).

    `datasets` reads its cache first; with HF_DATASETS_OFFLINE=1 it never reaches the hub.
    """
    try:
        import datasets
    except ImportError:
        raise ToolboxError("--dataset needs the datasets library: pip install 'rinna-toolbox[eval]'") from None
    name, _, config = spec.partition(":")
    if Path(spec).is_dir():
        name, config = spec, ""
    label = f"{spec} split {split}"
    datasets.logging.set_verbosity_error()
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # no retry chatter before the one-line error
    except ImportError:
        pass
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (missing config, network, cache)
        message = " ".join(str(exc).split()) or type(exc).__name__
        offline = os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = " (HF_DATASETS_OFFLINE is set and it is not in the cache)" if offline else ""
        raise ToolboxError(f"dataset {label}: cannot load{hint}: {message[:300]}") from None
    for i, row in enumerate(ds):
        yield Record(i, f"{label} row {i + 1}", row)


def load(
    records: Iterator[Record | ToolboxError],
    label: str,
    make_item: Callable[[Record], Any],
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    skip_invalid: bool = False,
) -> Loaded:
    """Validate every record through `make_item` (which raises ToolboxError naming the field),
    then shuffle (with `seed`) and cut to `limit`."""
    items, skipped, total = [], [], 0
    for record in records:
        total += 1
        try:
            if isinstance(record, ToolboxError):
                raise record
            items.append(make_item(record))
        except ToolboxError as exc:
            if not skip_invalid:
                raise ToolboxError(f"{exc} (or pass --skip-invalid to count and skip such records)") from None
            skipped.append(str(exc))
    if shuffle:
        random.Random(seed).shuffle(items)
    if limit is not None:
        items = items[:limit]
    return Loaded(label, items, total, len(skipped), skipped)


# -- field checks used by the tasks' item builders -----------------------------------------


def require(record: Record, name: str):
    if name not in record.fields:
        have = ", ".join(map(str, record.fields)) or "none"
        raise ToolboxError(f"{record.where}: no field {name!r} (fields: {have})")
    return record.fields[name]


def text(record: Record, name: str, empty_ok: bool = False) -> str:
    """Field `name` as a string: numbers are taken as their text, anything else is an error."""
    value = require(record, name)
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise ToolboxError(f"{record.where}: field {name!r} is not text (got {type(value).__name__})")
    value = value if isinstance(value, str) else str(value)
    if not empty_ok and not value.strip():
        raise ToolboxError(f"{record.where}: field {name!r} is empty")
    return value
