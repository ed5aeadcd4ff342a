"""Training data for `toolbox finetune`: read records, check them, encode them with sentencepiece.

Records come from JSONL / JSON / CSV / TSV / Parquet files or from a Hugging Face
dataset (a name, or a directory `datasets` can open). Each record is checked for its
task; a bad one is a one-line error naming the file, line and field, or, with
`skip_invalid`, counted by reason. Encoding uses the model's own sentencepiece
tokenizer (`toolbox.tokenizer.Tokenizer`); no torch here.

Tagging labels live on sentencepiece pieces. A character the vocabulary lacks is
spelled in byte-fallback pieces, of which sentencepiece gives only the last a
non-empty character span: `piece_spans` gives every byte piece the span of its
character, so all pieces of one character share a span (and a label).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from toolbox.errors import ToolboxError
from toolbox.heads import piece_spans, strip_span
from toolbox.prompts import chat_prompt, to_model_text

TASKS = ("classify", "tag", "lm")
FILE_FORMATS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
TAG_PREFIXES = ("B", "I", "E", "S")  # IOB2 and IOBES, as seqeval reads them
IGNORE = -100  # label of positions that carry no loss (transformers' convention)


@dataclass(frozen=True)
class Fields:
    """Record field names (the CLI's --text-field, --label-field, ...)."""

    text: str = "text"
    label: str = "label"
    tokens: str = "tokens"
    tags: str = "tags"
    entities: str = "entities"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from and how to read it."""

    train: str
    eval: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    eval_fraction: float | None = None  # default 0.1 when neither eval nor eval_split is given
    dataset_config: str | None = None
    fields: Fields = Fields()
    labels: tuple[str, ...] | None = None  # classify: the label set; tag: the entity types
    word_sep: str = " "  # tag, words + tags records: joins the words into the text
    skip_invalid: bool = False


class RecordError(Exception):
    """What is wrong with one record; `reason` is the short form the --skip-invalid summary counts."""

    def __init__(self, field: str | None, reason: str, detail: str = ""):
        super().__init__(reason)
        self.field, self.reason, self.detail = field, reason, detail

    def at(self, where: str) -> str:
        place = f"{where}: field '{self.field}'" if self.field else where
        return f"{place}: {self.detail or self.reason}"


# -- reading ------------------------------------------------------------------------


def read_records(source: str, split: str, config: str | None) -> Iterator[tuple[str, dict | RecordError]]:
    """(where, record) pairs of a file or dataset; a line that is not a JSON object comes as a RecordError."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".json"):
            yield from _json_records(path)
        elif suffix in (".csv", ".tsv"):
            yield from _csv_records(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            yield from _parquet_records(path)
        else:
            raise ToolboxError(f"{path}: unknown data format {suffix or '(no suffix)'!r} "
                               f"(expected one of {', '.join(FILE_FORMATS)})")
    elif path.is_dir():
        yield from _dataset_records(str(path), split, config, local=True)
    elif path.suffix.lower() in FILE_FORMATS or source.startswith((".", "/", "~")):
        raise ToolboxError(f"{source}: no such file")
    else:
        yield from _dataset_records(source, split, config, local=False)


def _json_records(path: Path) -> Iterator[tuple[str, dict | RecordError]]:
    with path.open(encoding="utf-8-sig") as f:
        try:
            head = f.read(4096)
        except UnicodeDecodeError as exc:
            raise ToolboxError(f"{path}: not UTF-8 text ({exc.reason})") from None
        f.seek(0)
        if path.suffix.lower() == ".json" and head.lstrip().startswith("["):
            try:
                items = json.load(f)
            except json.JSONDecodeError as exc:
                raise ToolboxError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
            for i, item in enumerate(items, 1):
                yield f"{path} item {i}", item if isinstance(item, dict) else RecordError(None, "not a JSON object")
            return
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"{path}:{lineno}", RecordError(None, "invalid JSON", f"invalid JSON ({exc.msg})")
                    continue
                yield f"{path}:{lineno}", item if isinstance(item, dict) else RecordError(None, "not a JSON object")
        except UnicodeDecodeError as exc:
            raise ToolboxError(f"{path}:{lineno + 1}: not UTF-8 text ({exc.reason})") from None


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            start = 2  # the header is line 1
            for row in reader:
                yield f"{path}:{start}", {k: v for k, v in row.items() if k is not None}
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise ToolboxError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise ToolboxError(f"{path}: {exc}") from None


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ToolboxError("reading Parquet needs pyarrow: pip install 'rinna-toolbox[train]'") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise ToolboxError(f"{path}: cannot read Parquet ({str(exc).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"{path} row {i}", row


def _dataset_records(name: str, split: str, config: str | None, local: bool) -> Iterator[tuple[str, dict]]:
    """Rows of a Hugging Face dataset, ClassLabel ids turned into their names."""
    try:
        import datasets
    except ImportError:
        raise ToolboxError("Hugging Face datasets need `datasets`: pip install 'rinna-toolbox[train]'") from None
    try:
        if local and (Path(name) / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(name)[split]
        elif local and (Path(name) / "state.json").is_file():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except KeyError:
        raise ToolboxError(f"dataset {name}: no split {split!r}") from None
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for offline, missing and bad data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if local else " (a dataset is found by name only when the hub is reachable or it is in the cache)"
        raise ToolboxError(f"dataset {name} [{split}]: {first}{hint}") from None
    names = {}
    for key, feature in ds.features.items():
        inner = getattr(feature, "feature", feature)
        if isinstance(inner, datasets.ClassLabel):
            names[key] = inner.names
    for i, row in enumerate(ds, 1):
        for key, label_names in names.items():
            value = row[key]
            row[key] = [label_names[v] for v in value] if isinstance(value, list) else label_names[value]
        yield f"{name} [{split}] row {i}", row


# -- checking -----------------------------------------------------------------------


def _need(record: dict, name: str):
    value = record.get(name)
    if value is None or (isinstance(value, float) and value != value):  # missing, null or a CSV/Parquet NaN
        raise RecordError(name, f"missing field '{name}'", "missing")
    return value


def _text(record: dict, name: str, allow_empty: bool = False) -> str:
    value = _need(record, name)
    if not isinstance(value, str):
        raise RecordError(name, f"field '{name}' is not a string", f"expected a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise RecordError(name, f"empty field '{name}'", "empty")
    return value


def _list(record: dict, name: str) -> list:
    value = _need(record, name)
    if isinstance(value, str):  # CSV cells: a JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(name, f"field '{name}' is not a list", "expected a list (JSON in a CSV cell)") from None
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    if not isinstance(value, list):
        raise RecordError(name, f"field '{name}' is not a list", f"expected a list, got {type(value).__name__}")
    return value


def _label(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(None, "label is not a string or integer", f"expected a string or integer, got {value!r}")
    label = str(value).strip()
    if not label:
        raise RecordError(None, "empty label", "empty")
    return label


def check_classify(record: dict, f: Fields) -> dict:
    text = _text(record, f.text)
    try:
        label = _label(_need(record, f.label))
    except RecordError as exc:
        raise RecordError(f.label, exc.reason, exc.detail) from None
    return {"text": text, "label": label}


def check_tag(record: dict, f: Fields, word_sep: str) -> dict:
    """A tagging record as text + sorted character-span entities (+ word spans for words + tags records)."""
    if record.get(f.tokens) is not None:
        return _check_words(record, f, word_sep)
    if record.get(f.text) is None:
        raise RecordError(f.text, f"missing field '{f.text}'", f"missing (or give '{f.tokens}' and '{f.tags}')")
    text = _text(record, f.text)
    raw = _list(record, f.entities) if record.get(f.entities) is not None else []
    entities = []
    for i, item in enumerate(raw, 1):
        if isinstance(item, dict):
            start, end, label = item.get("start"), item.get("end"), item.get("label", item.get("type"))
        elif isinstance(item, (list, tuple)) and len(item) == 3:
            start, end, label = item
        else:
            raise RecordError(f.entities, "malformed entity",
                              f"entity {i}: expected {{start, end, label}} or [start, end, label], got {item!r}")
        if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
            raise RecordError(f.entities, "malformed entity", f"entity {i}: start and end must be integers")
        if not isinstance(label, str) or not label.strip():
            raise RecordError(f.entities, "malformed entity", f"entity {i}: label must be a non-empty string")
        if not 0 <= start < end <= len(text):
            raise RecordError(f.entities, "entity out of range",
                              f"entity {i} [{start}, {end}) is out of range (the text has {len(text)} characters)")
        entities.append((start, end, label.strip(), i))
    entities.sort()
    for (s1, e1, _, i1), (s2, e2, _, i2) in zip(entities, entities[1:]):
        if s2 < e1:
            raise RecordError(f.entities, "overlapping entities",
                              f"entities {i1} [{s1}, {e1}) and {i2} [{s2}, {e2}) overlap")
    return {"text": text, "entities": [(s, e, label) for s, e, label, _ in entities], "units": None}


def _check_words(record: dict, f: Fields, word_sep: str) -> dict:
    words, tags = _list(record, f.tokens), _list(record, f.tags)
    if not words:
        raise RecordError(f.tokens, f"empty field '{f.tokens}'", "empty")
    if any(not isinstance(w, str) or not w for w in words):
        raise RecordError(f.tokens, "malformed words", "every word must be a non-empty string")
    if len(tags) != len(words):
        raise RecordError(f.tags, "tags and words differ in number", f"{len(tags)} tags for {len(words)} words")
    for i, tag in enumerate(tags, 1):
        if not isinstance(tag, str) or not (tag == "O" or (tag[:2] in {p + "-" for p in TAG_PREFIXES} and tag[2:])):
            raise RecordError(f.tags, "malformed tag", f"tag {i} {tag!r} is not O or B-/I-/E-/S-<type>")
    from seqeval.metrics.sequence_labeling import get_entities

    units, pos = [], 0
    for w in words:
        units.append((pos, pos + len(w)))
        pos += len(w) + len(word_sep)
    text = word_sep.join(words)
    entities = [(units[a][0], units[b][1], label) for label, a, b in get_entities(list(tags))]
    return {"text": text, "entities": sorted(entities), "units": units}


def check_lm(record: dict, f: Fields) -> dict:
    if record.get(f.instruction) is not None or record.get(f.output) is not None:
        instruction = _text(record, f.instruction)
        extra = record.get(f.input)
        if extra is not None and not isinstance(extra, str):
            raise RecordError(f.input, f"field '{f.input}' is not a string", "expected a string")
        if extra and extra.strip():
            instruction = f"{instruction}\n{extra}"
        return {"instruction": instruction, "output": _text(record, f.output)}
    return {"text": _text(record, f.text)}


# -- the whole data set -------------------------------------------------------------


@dataclass
class Skipped:
    """Invalid records passed over with --skip-invalid, by reason (with the first place each was seen)."""

    counts: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)

    def add(self, where: str, exc: RecordError) -> None:
        self.counts[exc.reason] += 1
        self.first.setdefault(exc.reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        parts = [f"{n} {reason} (first at {self.first[reason]})" for reason, n in self.counts.most_common()]
        return f"skipped {self.total} invalid record(s): " + "; ".join(parts)


@dataclass
class Records:
    """Checked records of both splits, with the label names and what was skipped."""

    task: str
    train: list[dict]
    eval: list[dict]
    labels: list[str]  # classify: class names; tag: entity types; lm: empty
    skipped: Skipped
    sources: dict  # split -> description

    def fingerprint(self) -> str:
        """sha256 of the checked records (task, label set, both splits): equal data, equal fingerprint."""
        h = hashlib.sha256()
        h.update(json.dumps({"task": self.task, "labels": self.labels}).encode())
        for name, records in (("train", self.train), ("eval", self.eval)):
            h.update(f"\n{name}\n".encode())
            for r in records:
                h.update(json.dumps(r, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
        return h.hexdigest()


def load_records(task: str, spec: DataSpec) -> Records:
    """Read and check both splits; the eval split comes from --eval, --eval-split or --eval-fraction."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    given = [name for name, v in (("--eval", spec.eval), ("--eval-split", spec.eval_split),
                                  ("--eval-fraction", spec.eval_fraction)) if v is not None]
    if len(given) > 1:
        raise ToolboxError(f"{' and '.join(given)} exclude each other: give one way to hold out evaluation data")
    if spec.eval_fraction is not None and not 0 <= spec.eval_fraction < 1:
        raise ToolboxError(f"--eval-fraction must be in [0, 1), got {spec.eval_fraction}")
    skipped = Skipped()
    train = _checked(task, spec, spec.train, spec.train_split, skipped)
    sources = {"train": _describe(spec.train, spec.train_split)}
    if spec.eval is not None:
        evaluation = _checked(task, spec, spec.eval, spec.eval_split or "validation", skipped)
        sources["eval"] = _describe(spec.eval, spec.eval_split or "validation")
    elif spec.eval_split is not None:
        if Path(spec.train).expanduser().is_file():
            raise ToolboxError("--eval-split picks a split of a dataset; for a file use --eval PATH or --eval-fraction")
        evaluation = _checked(task, spec, spec.train, spec.eval_split, skipped)
        sources["eval"] = _describe(spec.train, spec.eval_split)
    else:
        fraction = 0.1 if spec.eval_fraction is None else spec.eval_fraction
        order = list(range(len(train)))
        random.Random(0).shuffle(order)  # fixed: the held-out part does not move with --seed
        n_eval = round(len(train) * fraction)
        held = set(order[:n_eval])
        evaluation = [train[i] for i in sorted(held)]
        train = [r for i, r in enumerate(train) if i not in held]
        if n_eval:
            sources["eval"] = f"{n_eval} records held out of the training data ({fraction:g})"
    labels = _labels(task, spec, train, evaluation, skipped)
    if not train:
        raise ToolboxError(f"{spec.train}: no valid training records"
                           + (f" ({skipped.summary()})" if skipped.total else ""))
    return Records(task, [r for _, r in train], [r for _, r in evaluation], labels, skipped, sources)


def _describe(source: str, split: str) -> str:
    path = Path(source).expanduser()
    return str(path) if path.is_file() else f"{source} [{split}]"


def _checked(task: str, spec: DataSpec, source: str, split: str, skipped: Skipped) -> list[tuple[str, dict]]:
    f = spec.fields
    out = []
    for where, record in read_records(source, split, spec.dataset_config):
        try:
            if isinstance(record, RecordError):
                raise record
            if task == "classify":
                checked = check_classify(record, f)
            elif task == "tag":
                checked = check_tag(record, f, spec.word_sep)
            else:
                checked = check_lm(record, f)
        except RecordError as exc:
            if not spec.skip_invalid:
                raise ToolboxError(exc.at(where)) from None
            skipped.add(where, exc)
            continue
        out.append((where, checked))
    return out


def _labels(task: str, spec: DataSpec, train: list, evaluation: list, skipped: Skipped) -> list[str]:
    """The label set (given, or found in the training split); a record with another label is invalid."""
    if task == "lm":
        return []
    f = spec.fields

    def found(record):
        return [record["label"]] if task == "classify" else [e[2] for e in record["entities"]]

    def field_of(record):
        return f.label if task == "classify" else f.entities if record["units"] is None else f.tags

    if spec.labels:
        known = list(dict.fromkeys(spec.labels))
        splits = (train, evaluation)
    else:
        names = {label for _, r in train for label in found(r)}
        known = sorted(names, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
        splits = (evaluation,)
    allowed = set(known)
    for records in splits:
        kept = []
        for where, record in records:
            unknown = [label for label in found(record) if label not in allowed]
            if not unknown:
                kept.append((where, record))
                continue
            exc = RecordError(field_of(record), "unknown label",
                              f"unknown label {unknown[0]!r} (known: {', '.join(known) or 'none'})")
            if not spec.skip_invalid:
                raise ToolboxError(exc.at(where))
            skipped.add(where, exc)
        records[:] = kept
    if task == "classify" and len(known) < 2:
        raise ToolboxError(f"classification needs at least two labels; found {', '.join(known) or 'none'} "
                           f"(field '{f.label}'; give the set with --labels)")
    if task == "tag" and not known:
        raise ToolboxError(f"the training data has no entities (field '{f.entities}', or '{f.tags}' with '{f.tokens}')")
    return known


# -- encoding -----------------------------------------------------------------------


def bio_names(types: list[str]) -> list[str]:
    """Piece label names: O, then B-/I- for each entity type."""
    return ["O", *(f"{prefix}-{t}" for t in types for prefix in ("B", "I"))]


def align_entities(text: str, spans: list[tuple[int, int]], entities, label_ids: dict[str, int]):
    """BIO label ids of the pieces, and how many entities do not start and end on a piece boundary.

    A piece overlapping an entity belongs to it (the first such piece is B-, the rest I-);
    a piece already taken by an earlier entity stays with it.
    """
    labels = [label_ids["O"]] * len(spans)
    misaligned = 0
    for start, end, label in entities:
        inside = [i for i, (s, e) in enumerate(spans) if s < end and e > start and labels[i] == label_ids["O"]]
        if not inside:
            misaligned += 1
            continue
        labels[inside[0]] = label_ids[f"B-{label}"]
        for i in inside[1:]:
            labels[i] = label_ids[f"I-{label}"]
        covered = strip_span(text, spans[inside[0]][0], spans[inside[-1]][1])
        misaligned += covered != (start, end)
    return labels, misaligned


@dataclass
class Encoded:
    """Model inputs of both splits, plus what evaluation and the model card need."""

    train: list[dict]  # {"input_ids": [...], "labels": int | [...]}
    eval: list[dict]
    label_names: list[str]  # classify: classes; tag: BIO piece labels; lm: empty
    eval_meta: list = field(default_factory=list)  # tag: (text, piece spans, units, entities) per eval example
    stats: dict = field(default_factory=dict)


def encode(records: Records, tokenizer, max_length: int) -> Encoded:
    """Token ids and labels for the task, each sequence at most `max_length` tokens."""
    if max_length < 2:
        raise ToolboxError(f"--max-length must be at least 2, got {max_length}")
    eos = tokenizer.special_ids.get("eos")
    stats = Counter()
    if records.task == "classify":
        index = {name: i for i, name in enumerate(records.labels)}

        def one(r):
            ids = tokenizer.encode(r["text"])
            stats["truncated"] += len(ids) > max_length - 1
            ids = ids[: max_length - 1] + ([eos] if eos is not None else [])
            return {"input_ids": ids, "labels": index[r["label"]]}

        train, evaluation = [one(r) for r in records.train], [one(r) for r in records.eval]
        out = Encoded(train, evaluation, list(records.labels))
    elif records.task == "tag":
        names = bio_names(records.labels)
        index = {name: i for i, name in enumerate(names)}
        meta = []

        def one(r, keep_meta=False):
            tokens = tokenizer.tokens(r["text"])
            stats["truncated"] += len(tokens) > max_length
            tokens = tokens[:max_length]
            spans = piece_spans(tokens, len(r["text"]))
            labels, misaligned = align_entities(r["text"], spans, r["entities"], index)
            stats["entities"] += len(r["entities"])
            stats["misaligned_entities"] += misaligned
            if keep_meta:
                meta.append((r["text"], spans, r["units"], r["entities"]))
            return {"input_ids": [t.id for t in tokens], "labels": labels}

        train = [one(r) for r in records.train]
        evaluation = [one(r, keep_meta=True) for r in records.eval]
        out = Encoded(train, evaluation, names, meta)
    else:
        out = Encoded(_encode_lm(records.train, tokenizer, max_length, eos, stats),
                      _encode_lm(records.eval, tokenizer, max_length, eos, stats), [])
    if not out.train:
        raise ToolboxError("no training sequences are left after encoding (see --max-length)")
    out.stats = dict(stats)
    out.stats["max_length"] = max_length
    out.stats["train_tokens"] = sum(len(x["input_ids"]) for x in out.train)
    return out


def _encode_lm(records: list[dict], tokenizer, max_length: int, eos: int | None, stats: Counter) -> list[dict]:
    """Plain text: documents joined (each ended by EOS) and cut into blocks of `max_length`.
    Instruction records: the series' template, loss on the response (and its EOS) only."""
    end = [eos] if eos is not None else []
    stream: list[int] = []
    out = []
    for r in records:
        if "text" in r:
            stream.extend(tokenizer.encode(r["text"]) + end)
            continue
        prompt = tokenizer.encode(chat_prompt([("user", r["instruction"])]))
        response = tokenizer.encode(to_model_text(r["output"])) + end
        ids, labels = prompt + response, [IGNORE] * len(prompt) + response
        if len(ids) > max_length:
            stats["truncated"] += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE for x in labels):
                stats["dropped_no_room_for_response"] += 1
                continue
        out.append({"input_ids": ids, "labels": labels})
    for i in range(0, len(stream), max_length):
        block = stream[i : i + max_length]
        if len(block) > 1:  # a block of one token has nothing to predict
            out.append({"input_ids": block, "labels": list(block)})
    return out
