"""`toolbox generate --input/--output`: a JSONL batch file through the backend, resumable
(the records and their rules are in `toolbox.batchjob`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from toolbox import batchjob
from toolbox.commands.options import CLI_ADVICE
from toolbox.errors import ToolboxError


class BatchJob:
    """One batch run: `check` before the model loads, then `run`."""

    def __init__(self, input_path: str, output_path: str, field: str, batch_size: int, template: str = "auto",
                 truncate: str = "error"):
        self.source, self.output = Path(input_path), Path(output_path)
        self.field, self.batch_size, self.template, self.truncate = field, batch_size, template, truncate

    def check(self) -> None:
        if not self.source.is_file():
            raise ToolboxError(f"--input {self.source}: no such file")
        batchjob.check_output(self.output)

    def run(self, model, params) -> None:
        from rich.progress import Progress

        if batchjob.repair_tail(self.output):
            click.echo(f"note: cut a torn last line off {self.output} (an earlier run stopped mid-write)", err=True)
        done = batchjob.done_indices(self.output)
        todo = batchjob.count_todo(self.source, done)
        failures: list[str] = []
        written = 0
        nl = model.uses_template(self.template)
        records = batchjob.read_records(self.source, self.field, done, failures)
        with self.output.open("a", encoding="utf-8") as out, Progress(transient=True) as progress:
            task = progress.add_task("generating", total=todo)
            for batch in _batches(self._prompts(model, params, records, failures), self.batch_size):
                completions = model.run([ids for _, ids in batch], params, nl, batch_size=self.batch_size,
                                        texts=[item.prompt for item, _ in batch], errors="record")
                for (item, _), completion in zip(batch, completions):
                    failed = [s.error for s in completion.samples if s.error is not None]
                    if failed:  # not written: a rerun tries it again
                        failures.append(f"{self.source.name} line {item.index + 1}: generation failed: {failed[0]}")
                        continue
                    out.write(json.dumps(batchjob.result_record(item, completion), ensure_ascii=False) + "\n")
                    written += 1
                out.flush()
                progress.update(task, completed=written + len(failures))
        for message in failures:
            click.echo(f"Error: {message}", err=True)
        click.echo(f"{written} written, {len(done)} already done, {len(failures)} failed -> {self.output}", err=True)
        if failures:
            raise SystemExit(1)

    def _prompts(self, model, params, records, failures):
        for item in records:
            where = f"{self.source.name} line {item.index + 1}"
            try:
                ids = model.prompt_ids(item.prompt, params.max_new_tokens, self.template, self.truncate, where,
                                       advice=CLI_ADVICE, max_field="--max-new-tokens")
                yield item, ids
            except ToolboxError as exc:
                failures.append(str(exc))


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
