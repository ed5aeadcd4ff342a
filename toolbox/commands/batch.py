"""Batch generation from a JSONL file: batched through the backend, resumable, per-record errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from toolbox.errors import ToolboxError


def _done_indices(output: Path) -> set[int]:
    """Indices of records already written by an earlier run (a torn last line is ignored)."""
    done = set()
    if output.exists():
        for line in output.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                done.add(int(json.loads(line)["index"]))
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _read_records(path: Path, field: str, done: set[int], prompter, failures: list[str]):
    """(index, record, prompt ids) for each valid, not yet done record; bad ones go to `failures`."""
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            if index in done or not raw.strip():
                continue
            where = f"{path.name} line {index + 1}"
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ToolboxError(f"{where}: expected a JSON object")
                text = record.get(field)
                if not isinstance(text, str):
                    raise ToolboxError(f"{where}: field {field!r} missing or not a string")
                yield index, record, text, prompter.ids(text, where)
            except UnicodeDecodeError:
                failures.append(f"{where}: invalid UTF-8")
            except json.JSONDecodeError as exc:
                failures.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
            except ToolboxError as exc:
                failures.append(exc.message)


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_batch(prompter, input_path: str, output_path: str, field: str, batch_size: int) -> None:
    """Generate for every record of `input_path`, appending results to `output_path`."""
    from rich.progress import Progress

    from toolbox.commands.generate import Sequence, sequence_record

    source, output = Path(input_path), Path(output_path)
    if not source.is_file():
        raise ToolboxError(f"input file {source} does not exist")
    done = _done_indices(output)
    with source.open("rb") as f:
        todo = sum(1 for i, line in enumerate(f) if i not in done and line.strip())
    failures: list[str] = []
    written = 0
    params = prompter.params
    with output.open("a", encoding="utf-8") as out, Progress(transient=True) as progress:
        task = progress.add_task("generating", total=todo)
        records = _read_records(source, field, done, prompter, failures)
        for batch in _batches(records, batch_size):
            started = time.perf_counter()
            seqs = [Sequence() for _ in range(len(batch) * params.n)]
            events = prompter.loaded.model.generate([ids for *_, ids in batch], params, nl=prompter.nl)
            for event in events:
                seqs[event.seq].add(event)
            for i, (index, record, text, ids) in enumerate(batch):
                samples = [sequence_record(s, started) for s in seqs[i * params.n : (i + 1) * params.n]]
                result = {"index": index, **({"id": record["id"]} if "id" in record else {}),
                          "prompt": text, "prompt_tokens": len(ids)}
                result.update(samples[0] if params.n == 1 else {"samples": samples})
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            written += len(batch)
            progress.update(task, completed=written + len(failures))
    for message in failures:
        click.echo(f"Error: {message}", err=True)
    click.echo(
        f"{written} written, {len(done)} already done, {len(failures)} failed -> {output}", err=True
    )
    if failures:
        raise SystemExit(1)
