"""`toolbox generate --ray`: the batch job on Ray Data, an actor pool of toolbox models over the records.

Input: a JSONL, CSV or Parquet file, or a folder of them (subfolders included), local or
at an object-store URI that pyarrow's filesystems open (s3://, gs://, ...). Ray reads the
files (`read_binary_files`); each file is parsed into records by row, so a record keeps
its place in its file (`index`: the JSONL line or table row, 0-based) as in the
single-machine job. A pool of `--replicas` actors, each with its own model (and
`--gpus-per-actor` GPUs), turns batches of records into the very result records of
`toolbox.batchjob`; this process writes them as they come and shows rows/s.

Output: a JSONL file (one input file; the same file `toolbox generate --input` writes), or
a folder of shards: `<input name>.part-NNNN.jsonl`, or `.parquet` when the output's name
ends in .parquet, mirroring the input folder's layout. A rerun skips every record the
output already holds: a JSONL file or shard's torn last line is cut off first, and a
Parquet shard appears only once it is complete (the rows of an unfinished one are redone).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from toolbox import batchjob
from toolbox.errors import ToolboxError
from toolbox.ray.cluster import check_choice, connected, gpus_per_worker, portable, remote_error, require

WHAT = "toolbox generate --ray"
KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
SHARD_ROWS = 10_000  # rows per output shard (an unfinished Parquet shard is redone whole: what a crash can cost)
PART = ".part-"
# an actor call takes this many of the model's batches: Ray's cost per call (scheduling, Arrow
# conversion, the trip back to the driver) was 13 % of the work at one batch of 8 short prompts
BATCHES_PER_CALL = 4


@dataclass(frozen=True)
class Job:
    """What the command asked for (the --input/--output batch options and the Ray ones)."""

    input: str
    output: str
    field: str = "prompt"
    batch_size: int = 8
    template: str = "auto"
    truncate: str = "error"
    replicas: int = 1
    gpus: float | None = None  # per actor; None: one for a model on CUDA, else none


@dataclass(frozen=True)
class Source:
    """One input file: its path in the filesystem, its name relative to the input, and its kind."""

    path: str
    name: str
    kind: str

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]


# -- the filesystem side: inputs, outputs, what is done ------------------------------------------


def filesystem(spec: str, option: str):
    """(pyarrow filesystem, path in it) for a local path or a URI."""
    from pyarrow import fs

    if "://" not in spec:
        return fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))
    try:
        return fs.FileSystem.from_uri(spec)
    except (ValueError, OSError) as exc:
        raise ToolboxError(f"{option} {spec}: {str(exc).splitlines()[0]}") from None


def list_sources(spec: str) -> tuple[object, list[Source], bool]:
    """(filesystem, input files, whether --input names a folder): the file itself, or the JSONL, CSV and
    Parquet files under the folder."""
    from pyarrow import fs as pafs

    fs, root = filesystem(spec, "--input")
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise ToolboxError(f"--input {spec}: no such file or folder")
        if info.type == pafs.FileType.File:
            return fs, [Source(root, posixpath.basename(root), KINDS.get(_suffix(root), "jsonl"))], False
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise ToolboxError(f"--input {spec}: {str(exc).splitlines()[0]}") from None
    sources = []
    for item in sorted(found, key=lambda i: i.path):
        name = posixpath.relpath(item.path, root)
        hidden = any(part.startswith((".", "_")) for part in name.split("/"))  # .crc, _SUCCESS, ...
        if item.type == pafs.FileType.File and not hidden and _suffix(name) in KINDS:
            sources.append(Source(item.path, name, KINDS[_suffix(name)]))
    if not sources:
        raise ToolboxError(f"--input {spec}: the folder holds no .jsonl, .csv or .parquet files")
    return fs, sources, True


def _suffix(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


class FileSink:
    """One local JSONL file, appended to as records come (the single-machine job's output)."""

    ordered = True

    def __init__(self, output: str, source: Source):
        self.output, self.source = Path(output), source
        batchjob.check_output(self.output)
        if batchjob.repair_tail(self.output):
            click.echo(f"note: cut a torn last line off {self.output} (an earlier run stopped mid-write)", err=True)
        self.done = {source.name: batchjob.done_indices(self.output)}
        self._file = None

    def write(self, source: str, lines: list[str]) -> None:
        if self._file is None:
            self._file = self.output.open("a", encoding="utf-8")
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class FolderSink:
    """A folder (local or object store) of shards, `<input name>.part-NNNN.<jsonl|parquet>`; see the module."""

    ordered = False

    def __init__(self, output: str, sources: list[Source], kind: str):
        self.spec, self.kind = output, kind
        self.fs, self.root = filesystem(output.rstrip("/") or output, "--output")
        self.local = type(self.fs).__name__ == "LocalFileSystem"
        stems = {}
        for s in sources:
            if s.stem in stems:
                raise ToolboxError(f"--output {output}: inputs {stems[s.stem]} and {s.name} would write the same "
                                   "shards; rename one")
            stems[s.stem] = s.name
        self._names = stems  # output stem -> input name
        self.done = {s.name: set() for s in sources}
        self._next = dict.fromkeys(stems, 0)  # the next part number per stem
        self._open: dict[str, _Shard] = {}
        try:
            self.fs.create_dir(self.root, recursive=True)
            self._scan()
        except OSError as exc:
            raise ToolboxError(f"--output {output}: {str(exc).splitlines()[0]}") from None

    def _scan(self) -> None:
        """Record the indices of the shards already written; drop unfinished Parquet shards."""
        from pyarrow import fs as pafs

        extension = "." + self.kind
        for item in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True)):
            if item.type != pafs.FileType.File:
                continue
            name = posixpath.relpath(item.path, self.root)
            if name.endswith(extension + ".tmp"):
                self.fs.delete_file(item.path)
                continue
            stem, sep, part = name[: -len(extension)].rpartition(PART) if name.endswith(extension) else ("", "", "")
            if not sep or stem not in self._names or not part.isdigit():
                continue
            self._next[stem] = max(self._next[stem], int(part) + 1)
            if self.kind == "jsonl" and self.local and batchjob.repair_tail(Path(item.path)):
                click.echo(f"note: cut a torn last line off {item.path} (an earlier run stopped mid-write)", err=True)
            self.done[self._names[stem]].update(self._indices(item.path))

    def _indices(self, path: str) -> set[int]:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return set(pq.read_table(path, columns=["index"], filesystem=self.fs).column("index").to_pylist())
        with self.fs.open_input_stream(path) as f:
            return _line_indices(f.read().splitlines())

    def write(self, source: str, lines: list[str]) -> None:
        stem = posixpath.splitext(source)[0]
        shard = self._open.get(stem)
        if shard is None:
            shard = self._open[stem] = _Shard(self, f"{stem}{PART}{self._next[stem]:04d}.{self.kind}")
            self._next[stem] += 1
        shard.add(lines)
        if shard.rows >= SHARD_ROWS:
            shard.close()
            del self._open[stem]

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()


class _Shard:
    """One output shard: JSONL lines streamed to it, or Parquet rows written whole at the end."""

    def __init__(self, sink: FolderSink, name: str):
        self.sink, self.path, self.rows = sink, posixpath.join(sink.root, name), 0
        parent = posixpath.dirname(self.path)
        if parent != sink.root:
            sink.fs.create_dir(parent, recursive=True)
        self._rows: list[dict] = []
        self._stream = sink.fs.open_output_stream(self.path) if sink.kind == "jsonl" else None

    def add(self, lines: list[str]) -> None:
        self.rows += len(lines)
        if self._stream is not None:
            self._stream.write("".join(line + "\n" for line in lines).encode("utf-8"))
            self._stream.flush()
        else:
            self._rows.extend(_parquet_row(json.loads(line)) for line in lines)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs = self.sink.fs
        target = self.path + ".tmp" if self.sink.local else self.path  # an object appears whole on close
        table = pa.Table.from_pylist(self._rows)
        for name in ("id", "error"):  # all null here: typed as text, as where they are set
            where = table.schema.get_field_index(name)
            if pa.types.is_null(table.schema.field(where).type):
                table = table.set_column(where, name, table.column(where).cast(pa.string()))
        pq.write_table(table, target, filesystem=fs)
        if target != self.path:
            fs.move(target, self.path)


def _parquet_row(record: dict) -> dict:
    """A result record with the optional fields present (null when absent), so every row has one schema."""
    return {"index": record["index"], "id": record.get("id"), **record, "error": record.get("error")}


def _line_indices(lines) -> set[int]:
    done = set()
    for line in lines:
        try:
            done.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError):
            continue
    return done


def open_sink(output: str, sources: list[Source], input_is_folder: bool):
    """The output named by --output: a folder of shards, or one JSONL file (see the module docstring)."""
    from pyarrow import fs as pafs

    name = output.rstrip("/")
    folder = (output.endswith("/") or "://" in output or _suffix(name) == ".parquet" or input_is_folder
              or os.path.isdir(os.path.expanduser(output)))
    if not folder:
        return FileSink(output, sources[0])
    fs, root = filesystem(name or output, "--output")
    if fs.get_file_info(root).type == pafs.FileType.File:
        raise ToolboxError(f"--output {output}: a file; {'a folder of inputs' if input_is_folder else 'this output'}"
                           " needs a folder of shards (name a new folder, or one ending in /)")
    return FolderSink(output, sources, "parquet" if _suffix(name) == ".parquet" else "jsonl")


def count_todo(sources: list[Source], done: dict[str, set[int]]) -> int | None:
    """Records (and bad records) left to do, when that is cheap to know here (local JSONL and Parquet
    inputs), else None. Zero: a rerun of a finished job, which then needs no cluster."""
    total = 0
    for s in sources:
        if not os.path.isfile(s.path) or s.kind == "csv":
            return None
        if s.kind == "jsonl":
            total += batchjob.count_todo(Path(s.path), done[s.name])
        else:
            import pyarrow.parquet as pq

            total += pq.ParquetFile(s.path).metadata.num_rows - len(done[s.name])
    return total


# -- the cluster side: parsing files into records, the model actors ---------------------------------


def parse_file(row: dict, *, names: dict[str, str], kinds: dict[str, str], field: str,
               done: dict[str, set[int]]) -> list[dict]:
    """One input file (a `read_binary_files` row) -> its records not yet done, and its bad records
    as failures; the same checks and messages as the single-machine job."""
    name = names[row["path"]]
    kind, skip, failures = kinds[name], done.get(name, set()), []
    if kind == "jsonl":
        records = [(r.index, r.record.get("id", _NO_ID), r.prompt, f"{name} line {r.index + 1}")
                   for r in batchjob.parse_lines(io.BytesIO(row["bytes"]), name, field, skip, failures)]
    else:
        records = _table_records(row["bytes"], name, kind, field, skip, failures)
    rows = [_record_row(name, index, record_id, prompt, where) for index, record_id, prompt, where in records]
    return rows + [_record_row(name, -1, _NO_ID, "", "", failure=message) for message in failures]


_NO_ID = object()


def _record_row(source, index, record_id, prompt, where, failure="") -> dict:
    # the id travels as JSON text ("" when the record has none): its type varies from file to file
    ident = "" if record_id is _NO_ID else json.dumps(record_id, ensure_ascii=False)
    return {"source": source, "index": index, "id": ident, "prompt": prompt, "where": where, "failure": failure}


def _table_records(data: bytes, name: str, kind: str, field: str, skip: set[int], failures: list[str]):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if kind == "csv":
            table = pcsv.read_csv(pa.BufferReader(data),
                                  convert_options=pcsv.ConvertOptions(column_types={field: pa.string()}))
        else:
            table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        failures.append(f"{name}: cannot read it as {kind.upper()} ({str(exc).splitlines()[0]})")
        return []
    if field not in table.column_names:
        failures.append(f"{name}: no column {field!r} (columns: {', '.join(table.column_names)})")
        return []
    texts = table.column(field).to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else [_NO_ID] * len(texts)
    out = []
    for index, (text, record_id) in enumerate(zip(texts, ids)):
        where = f"{name} row {index + 1}"
        if index in skip:
            continue
        if not isinstance(text, str):
            failures.append(f"{where}: field {field!r} missing or not a string")
        elif not text:
            failures.append(f"{where}: field {field!r} is empty")
        else:
            out.append((index, record_id, text, where))
    return out


class Generator:
    """One actor of the pool: a model, and batches of records in, result records (JSON text) out."""

    def __init__(self, choice, params, template: str, truncate: str, batch_size: int):
        self.model = choice.load("generate")
        self.params, self.template, self.truncate, self.batch_size = params, template, truncate, batch_size
        self.nl = self.model.uses_template(template)

    def __call__(self, batch):
        import pyarrow as pa

        from toolbox.commands.options import CLI_ADVICE

        out, todo = [], []
        for row in batch.to_pylist():
            failure = row["failure"]
            if not failure:
                try:
                    ids = self.model.prompt_ids(row["prompt"], self.params.max_new_tokens, self.template,
                                                self.truncate, row["where"], advice=CLI_ADVICE,
                                                max_field="--max-new-tokens")
                    todo.append((row, ids))
                    continue
                except ToolboxError as exc:
                    failure = str(exc)
            out.append(_result(row, failure=failure))
        completions = self.model.run([ids for _, ids in todo], self.params, self.nl, batch_size=self.batch_size,
                                     texts=[row["prompt"] for row, _ in todo], errors="record") if todo else []
        for (row, _), completion in zip(todo, completions):
            failed = [s.error for s in completion.samples if s.error is not None]
            if failed:  # not written: a rerun tries it again
                out.append(_result(row, failure=f"{row['where']}: generation failed: {failed[0]}"))
                continue
            item = batchjob.InputRecord(row["index"], {"id": json.loads(row["id"])} if row["id"] else {}, row["prompt"])
            line = json.dumps(batchjob.result_record(item, completion), ensure_ascii=False)
            out.append(_result(row, line=line, tokens=sum(len(s.token_ids) for s in completion.samples)))
        schema = pa.schema([("source", pa.string()), ("index", pa.int64()), ("line", pa.string()),
                            ("failure", pa.string()), ("tokens", pa.int64())])
        return pa.Table.from_pylist(out, schema=schema)


def _result(row: dict, line: str = "", failure: str = "", tokens: int = 0) -> dict:
    return {"source": row["source"], "index": row["index"], "line": line, "failure": failure, "tokens": tokens}


# -- the job --------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the job has done so far, for the progress view and the summary."""

    started: float = field(default_factory=time.perf_counter)
    written: int = 0
    tokens: int = 0
    failures: list[str] = field(default_factory=list)

    def rates(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return f"{self.written / elapsed:.1f} rows/s, {self.tokens / elapsed:.0f} tokens/s"


def run(choice, params, job: Job, address: str | None = None) -> Tally:
    """Run the job to the end; failed records are reported (one line each) and the exit status is 1."""
    require(WHAT, "ray.data")  # before anything is read or created
    check_choice(choice)
    fs, sources, input_is_folder = list_sources(job.input)
    sink = open_sink(job.output, sources, input_is_folder)
    done = sink.done
    tally = Tally()
    already = sum(len(v) for v in done.values())
    try:
        todo = count_todo(sources, done)
        if todo != 0:
            with connected(address, WHAT, "ray.data") as ray:
                _execute(ray, choice, params, job, fs, sources, done, sink, tally, todo)
    finally:
        sink.close()
    for message in tally.failures:
        click.echo(f"Error: {message}", err=True)
    click.echo(f"{tally.written} written, {already} already done, {len(tally.failures)} failed -> {job.output} "
               f"({tally.rates()})", err=True)
    if tally.failures:
        raise SystemExit(1)
    return tally


def _execute(ray, choice, params, job, fs, sources, done, sink, tally: Tally, todo: int | None) -> None:
    import logging

    quiet = logging.getLogger("ray.data")  # Ray Data's notes on its own execution; errors still show
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        _stream(ray, choice, params, job, fs, sources, done, sink, tally, todo)
    finally:
        quiet.setLevel(level)


def _stream(ray, choice, params, job, fs, sources, done, sink, tally: Tally, todo: int | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below says what matters: rows and tokens per second
    context.print_on_execution_start = False
    context.execution_options.preserve_order = sink.ordered
    cpus = choice.threads or 1  # an actor's torch threads, and the CPUs Ray reserves for it
    gpus = job.gpus if job.gpus is not None else gpus_per_worker(
        choice.backend, choice.device, float(ray.cluster_resources().get("GPU", 0)))
    _warn_capacity(ray, job.replicas, cpus, gpus)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rates]}"),
               TimeElapsedColumn()]
    try:
        # A task takes whole blocks and returns its results at its end, and a file arrives as one block:
        # cut the records into blocks of a batch, so that every actor gets work and the results come
        # (and are written) batch by batch. The cut runs to the end before the actors exist (they may
        # hold every CPU, and it needs one); it holds only the prompts, and gives the count for the view.
        records = _records(ray, fs, sources, done, job)
        block = job.batch_size * BATCHES_PER_CALL
        records = records.repartition(target_num_rows_per_block=block).materialize()
        todo = records.count()
        results = records.map_batches(
            Generator, batch_size=block, batch_format="pyarrow",
            fn_constructor_kwargs={"choice": replace(portable(choice), threads=cpus if gpus == 0 else choice.threads),
                                   "params": params, "template": job.template, "truncate": job.truncate,
                                   "batch_size": job.batch_size},
            compute=ray.data.ActorPoolStrategy(size=job.replicas), num_cpus=cpus, num_gpus=gpus,
        )
        tally.started = time.perf_counter()
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task("generating", total=todo, rates="")
            for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
                by_source: dict[str, list[str]] = {}
                for row in batch.to_pylist():
                    if row["failure"]:
                        tally.failures.append(row["failure"])
                    else:
                        by_source.setdefault(row["source"], []).append(row["line"])
                        tally.written += 1
                        tally.tokens += row["tokens"]
                for source, lines in by_source.items():
                    sink.write(source, lines)
                progress.update(task, completed=tally.written + len(tally.failures), rates=tally.rates())
    except Exception as exc:  # noqa: BLE001 - Ray reports an actor's failure as its own exception types
        raise ToolboxError(f"the batch job failed: {remote_error(exc)}") from None


def _records(ray, fs, sources: list[Source], done: dict[str, set[int]], job: Job):
    """The input files read and parsed into records (those not done yet, and the bad ones as failures).
    Reading and parsing reserve no CPU: the actors may hold them all, and these steps are light."""
    names = {s.path: s.name for s in sources}
    records = ray.data.read_binary_files([s.path for s in sources], include_paths=True, filesystem=fs, num_cpus=0)
    return records.flat_map(parse_file, num_cpus=0, fn_kwargs={
        "names": names, "kinds": {s.name: s.kind for s in sources}, "field": job.field, "done": done})


def _warn_capacity(ray, replicas: int, cpus: float, gpus: float) -> None:
    have = ray.cluster_resources()
    for kind, each in (("CPU", cpus), ("GPU", gpus)):
        if each and replicas * each > have.get(kind, 0):
            click.echo(f"warning: {replicas} actors of {each:g} {kind} each need {replicas * each:g} {kind}s; the "
                       f"cluster has {have.get(kind, 0):g} now, so some wait for more (an autoscaling cluster adds "
                       "nodes)", err=True)


def from_cli(use_ray: bool, choice, params, input_path, output_path, field_name: str, batch_size: int, template: str,
             truncate: str, replicas: int | None, gpus: float | None, address: str | None) -> None:
    """`toolbox generate` with a Ray option: check the combination, run the job (Ctrl-C: exit 130)."""
    import sys

    if not use_ray:
        raise click.UsageError("--replicas, --gpus-per-actor and --ray-address go with --ray")
    if not input_path or not output_path:
        raise click.UsageError("--ray runs a batch job: give --input and --output")
    job = Job(input_path, output_path, field_name, batch_size, template, "left" if truncate == "left" else "error",
              replicas or 1, gpus)
    try:
        run(choice, params, job, address)
    except KeyboardInterrupt:
        click.echo("interrupted (the records written so far are kept; a rerun goes on from there)", err=True)
        sys.exit(130)
