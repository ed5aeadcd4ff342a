"""Task definitions: what to read, how to prompt, what to measure.

A task is a small YAML or TOML file (or a built-in name, or the command's options): its
kind (generate, choice, perplexity), its data, the field mapping, a prompt template over the
record's fields (Python `str.format`, so `{article:.3000}` keeps the first 3,000 characters),
the metrics and the generation settings. Item builders turn each record into what the model
sees, raising one-line errors that name the record and the field.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import ToolboxError
from toolbox.eval import data
from toolbox.eval.metrics import CHOICE_METRICS, PERPLEXITY_METRICS, TEXT_METRICS, TOKENIZER_CHOICES

KINDS = ("generate", "choice", "perplexity")
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed")
DEFAULT_METRICS = {"generate": TEXT_METRICS, "choice": CHOICE_METRICS, "perplexity": PERPLEXITY_METRICS}


@dataclass
class Task:
    """One evaluation. Paths in a task file are relative to the file."""

    name: str = "custom"
    kind: str = "generate"
    description: str = ""
    data: str | None = None  # a local file
    dataset: str | None = None  # a Hugging Face dataset "name[:config]"
    split: str = "test"
    template: str | None = None  # prompt (generate) or context (choice) over the record's fields
    input_field: str | None = None  # the field the prompt is made of (generate, choice) or scored (perplexity)
    reference_field: str | None = None
    prediction_field: str = "prediction"  # in a --predictions file
    id_field: str | None = None  # a stable item id (default: the record's position)
    choices_field: str | None = None  # a list field, or several fields joined by commas
    choices: list[str] | None = None  # the same choices for every item (e.g. JNLI's labels)
    label_field: str | None = None  # the right choice: its index (from 0) or its text
    delimiter: str = " "  # between context and choice, as lm-evaluation-harness's target_delimiter
    metrics: list[str] | None = None
    metric_tokenizer: str = "auto"
    prompt_format: str = "auto"  # auto | plain | rinna-chat (the instruction variants' template)
    truncate: str = "error"  # a prompt too long for the context: error, or keep its last tokens ("left")
    generation: dict = field(default_factory=dict)
    limit: int | None = None
    shuffle: bool = False
    seed: int = 0

    def check(self, predictions: bool = False) -> Task:
        """Reject settings that cannot work, before any data or model is loaded (`predictions`:
        scoring a predictions file, which needs no prompt)."""
        if self.kind not in KINDS:
            raise ToolboxError(f"task {self.name}: kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        allowed = DEFAULT_METRICS[self.kind]
        for m in self.metrics or ():
            if m not in allowed:
                raise ToolboxError(f"task {self.name}: metric {m!r} is not a {self.kind} metric ({', '.join(allowed)})")
        if self.metric_tokenizer not in TOKENIZER_CHOICES:
            raise ToolboxError(f"task {self.name}: metric_tokenizer {self.metric_tokenizer!r}; "
                               f"expected one of {', '.join(TOKENIZER_CHOICES)}")
        check_generation(self.generation, f"task {self.name}")
        if self.kind == "generate" and not self.reference_field:
            raise ToolboxError(f"task {self.name}: no reference field (--reference-field)")
        if self.kind in ("generate", "choice") and not predictions and not (self.template or self.input_field):
            raise ToolboxError(f"task {self.name}: no prompt: give a template (--template) "
                               "or an input field (--input-field)")
        if self.kind == "perplexity" and not self.input_field:
            raise ToolboxError(f"task {self.name}: no text field to score (--text-field)")
        if self.kind == "choice":
            if bool(self.choices_field) == bool(self.choices):
                raise ToolboxError(f"task {self.name}: give the choices as a field (--choices-field) "
                                   "or as fixed texts (--choice), one of the two")
            if not self.label_field:
                raise ToolboxError(f"task {self.name}: no label field (--label-field)")
        if self.truncate not in ("error", "left"):
            raise ToolboxError(f"task {self.name}: truncate {self.truncate!r}; expected error or left")
        if self.template is not None:
            template_fields(self.template)
        return self

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(self.metrics or DEFAULT_METRICS[self.kind])

    @property
    def prompt_template(self) -> str | None:
        if self.template is not None:
            return self.template
        return "{" + self.input_field + "}" if self.input_field else None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, [], {})}


def check_generation(generation: dict, origin: str) -> None:
    """Generation settings of the right names and types (their ranges are the model's to check)."""
    unknown = sorted(set(generation) - set(GENERATION_KEYS))
    if unknown:
        raise ToolboxError(f"{origin}: unknown generation setting {unknown[0]!r} (known: {', '.join(GENERATION_KEYS)})")
    for key, value in generation.items():
        if key == "stop":
            ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
        elif key in ("max_new_tokens", "top_k", "seed"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            want = "a list of strings" if key == "stop" else "a whole number" if key in ("max_new_tokens", "top_k",
                                                                                         "seed") else "a number"
            raise ToolboxError(f"{origin}: generation setting {key!r} should be {want}, got {value!r}")


def template_fields(template: str) -> list[str]:
    """The record fields a template uses; a one-line error for a malformed template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ToolboxError(f"template {template!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or not name.replace("_", "a").replace("-", "a").replace(" ", "a").isalnum():
            raise ToolboxError(f"template {template!r}: {{{name}}} is not a field name")
        names.append(name)
    return names


def render(template: str, record: data.Record) -> str:
    """Fill `template` from the record's fields."""
    values = {name: data.text(record, name, empty_ok=True) for name in template_fields(template)}
    try:
        return template.format_map(values)
    except (ValueError, TypeError) as exc:
        raise ToolboxError(f"{record.where}: template {template!r}: {exc}") from None


# -- items -------------------------------------------------------------------------


@dataclass
class Item:
    """What one record becomes: the model's input and what the answer is checked against."""

    key: Any  # the id field's value, else the record's position
    where: str
    prompt: str | None = None  # generate: the prompt; choice: the context
    reference: str | None = None
    prediction: str | None = None  # from a --predictions file
    choices: list[str] | None = None
    label: int | None = None
    text: str | None = None  # perplexity
    input: dict = field(default_factory=dict)


def item_builder(task: Task, predictions: bool = False):
    """A function Record -> Item for `task` that validates the fields it needs."""
    seen: set = set()

    def key_of(record: data.Record):
        if not task.id_field:
            return record.index
        key = data.require(record, task.id_field)
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise ToolboxError(f"{record.where}: field {task.id_field!r} is not a string or integer id")
        if key in seen:
            raise ToolboxError(f"{record.where}: duplicate id {key!r} in field {task.id_field!r}")
        seen.add(key)
        return key

    def inputs(record: data.Record) -> dict:
        if not (task.input_field or task.template):
            return {}
        names = [task.input_field] if task.input_field else template_fields(task.prompt_template)
        return {n: data.require(record, n) for n in dict.fromkeys(names)}

    def generate(record: data.Record) -> Item:
        reference = data.text(record, task.reference_field)
        if predictions:
            return Item(key_of(record), record.where, reference=reference, input=inputs(record),
                        prediction=data.text(record, task.prediction_field, empty_ok=True))
        prompt = render(task.prompt_template, record)
        if not prompt.strip():
            raise ToolboxError(f"{record.where}: empty prompt")
        return Item(key_of(record), record.where, prompt=prompt, reference=reference, input=inputs(record))

    def choice(record: data.Record) -> Item:
        context = render(task.prompt_template, record)
        choices = task.choices or _choices(record, task.choices_field)
        return Item(key_of(record), record.where, prompt=context, choices=choices,
                    label=_label(record, task.label_field, choices), input=inputs(record))

    def perplexity(record: data.Record) -> Item:
        return Item(key_of(record), record.where, text=data.text(record, task.input_field))

    return {"generate": generate, "choice": choice, "perplexity": perplexity}[task.kind]


def _choices(record: data.Record, spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",")]
    if len(names) > 1:
        return [data.text(record, n) for n in names]
    value = data.require(record, names[0])
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise ToolboxError(f"{record.where}: field {names[0]!r} is not a list of at least two choices")
    for i, c in enumerate(value):
        if not isinstance(c, str) or not c:
            raise ToolboxError(f"{record.where}: field {names[0]!r}: choice {i} is empty or not text")
    return list(value)


def _label(record: data.Record, name: str, choices: list[str]) -> int:
    value = data.require(record, name)
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(choices):
            return value
        raise ToolboxError(f"{record.where}: field {name!r}: label {value} is outside 0..{len(choices) - 1}")
    raise ToolboxError(f"{record.where}: field {name!r}: {value!r} is neither a choice index nor one of the choices")


# -- task files and built-ins ------------------------------------------------------


BUILTIN = {
    "cnn_dailymail": {
        "description": "CNN / Daily Mail news summarization (English): article in, highlights as the reference",
        "kind": "generate",
        "dataset": "abisee/cnn_dailymail:3.0.0",
        "split": "test",
        "id_field": "id",
        "input_field": "article",
        "reference_field": "highlights",
        "template": "{article:.3000}\nTL;DR:",
        "generation": {"max_new_tokens": 128, "temperature": 0, "stop": ["\n\n"]},
    },
    "xlsum_ja": {
        "description": "XL-Sum Japanese news summarization: article in, its summary paragraph as the reference",
        "kind": "generate",
        "dataset": "mkshing/xlsum_ja",
        "split": "test",
        "input_field": "text",
        "reference_field": "summary",
        "template": "次のニュース記事を要約してください。\n\n{text:.1500}\n\n要約：",
        "generation": {"max_new_tokens": 128, "temperature": 0, "stop": ["\n"]},
    },
}


def from_dict(values: dict, name: str, origin: str, base: Path | None = None) -> Task:
    """A Task from a mapping (a parsed task file); unknown keys and wrong types are errors naming `origin`."""
    known = {f.name: f for f in dataclasses.fields(Task)}
    if not isinstance(values, dict):
        raise ToolboxError(f"{origin}: expected a mapping of task settings")
    for key, value in values.items():
        if key not in known:
            raise ToolboxError(f"{origin}: unknown key {key!r} (known: {', '.join(known)})")
        expected = {"generation": dict, "metrics": list, "choices": list, "limit": int, "seed": int, "shuffle": bool}
        want = expected.get(key, str)
        if value is not None and not isinstance(value, want) or isinstance(value, bool) and want is int:
            raise ToolboxError(f"{origin}: {key!r} should be a {want.__name__}, got {type(value).__name__}")
    check_generation(values.get("generation") or {}, origin)
    values = dict(values)
    if base is not None and values.get("data") and not Path(values["data"]).is_absolute():
        values["data"] = str(base / values["data"])
    values.setdefault("name", name)
    return Task(**values)


def load_task(spec: str) -> Task:
    """A built-in task by name, or a .yaml / .yml / .toml task file."""
    if spec in BUILTIN:
        return from_dict(BUILTIN[spec], spec, f"built-in task {spec}")
    path = Path(spec)
    if not path.is_file():
        raise ToolboxError(f"task {spec!r}: no such file or built-in task (built-ins: {', '.join(BUILTIN)})")
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ToolboxError("YAML task files need pyyaml: pip install 'rinna-toolbox[eval]'") from None
            values = yaml.safe_load(raw.decode("utf-8"))
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ModuleNotFoundError:
                    raise ToolboxError("TOML task files need Python 3.11 or tomli: pip install tomli") from None
            values = tomllib.loads(raw.decode("utf-8"))
        else:
            raise ToolboxError(f"{path}: unknown task file type {suffix!r} (expected .yaml, .yml or .toml)")
    except UnicodeDecodeError:
        raise ToolboxError(f"{path}: invalid UTF-8") from None
    except ToolboxError:
        raise
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError, tomllib.TOMLDecodeError
        raise ToolboxError(f"{path}: not valid {suffix[1:].upper()} ({' '.join(str(exc).split())})") from None
    return from_dict(values, path.stem, str(path), path.parent)
