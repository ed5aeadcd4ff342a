"""Run a task: items through a model (or an endpoint, or a predictions file) into per-item records.

Items go to the model in batches (`Model.run` with a batch of prompts, one backend scoring
call for all the choices of a batch, `Model.score` for texts), each
finished batch is appended to the output JSONL at once, and a rerun with the same output
skips the items already there, so an interrupted run resumes where it stopped and ends with
the same records as one that never stopped. Every record carries a fingerprint of the
settings that made it; resuming with other settings is an error rather than a mixed file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from toolbox.errors import ToolboxError
from toolbox.eval.metrics import TextScorer, choice_result, pick_tokenizer
from toolbox.eval.tasks import Item, Task


class EvalModel(Protocol):
    """What a run needs from a model: a local toolbox model and an endpoint both provide it."""

    name: str

    def generate(self, prompts: list[str], wheres: list[str], generation: dict, prompt_format: str,
                 truncate: str) -> tuple[list[tuple[str, int | None, str | None]], int]:
        """(text, generated tokens if known, finish reason) per prompt, and the tokens generated in all;
        greedy unless `generation` says otherwise; a prompt that cannot run is an error naming its `where`."""

    def loglikelihood(self, pairs: list[tuple[str, str]], wheres: list[str]) -> list[tuple[float, bool, int]]:
        """(log p(continuation | context), whether it is the greedy continuation, tokens scored) per pair;
        a pair that cannot be scored is an error naming its `where`."""

    def score(self, texts: list[str]) -> list[tuple[float, int]]:
        """(negative log-likelihood in nats, tokens scored) per text."""


class LocalModel:
    """A model loaded by `toolbox.load`: prompts go through `Model.run` in one batch, as
    `toolbox generate --input` sends them."""

    def __init__(self, model, batch_size: int = 8):
        self.model, self.name, self.batch_size = model, model.name, batch_size

    def generate(self, prompts, wheres, generation, prompt_format, truncate):
        settings = {"temperature": 0.0, **generation}
        settings["stop"] = tuple(settings.get("stop") or ())
        params = self.model.params(**settings)
        ids = [self.model.prompt_ids(p, params.max_new_tokens, prompt_format, truncate, where)
               for p, where in zip(prompts, wheres)]
        completions = self.model.run(ids, params, self.model.uses_template(prompt_format), batch_size=self.batch_size)
        outputs = [(c.text, len(c.token_ids), c.finish_reason) for c in completions]
        return outputs, sum(n for _, n, _ in outputs)

    def loglikelihood(self, pairs, wheres):
        """Split as lm-evaluation-harness splits (not `Model.loglikelihood`'s common-prefix split),
        so that acc and acc_norm are lm-eval's on the same model."""
        from toolbox import likelihood

        encode, start = self.model.tokenizer.encode, likelihood.start_token(self.model)
        ids = [likelihood.split(encode, c, x, start) for c, x in pairs]
        found = likelihood.score(self.model, ids, self.model.context_length, 4 * self.batch_size, wheres)
        return [(lp, greedy, len(c) + len(x)) for (lp, greedy), (c, x) in zip(found, ids)]

    def score(self, texts):
        scores = self.model.score(texts)
        return [(-sum(t.logprobs), len(t.logprobs)) for t in scores.texts]


# Scoring runs take this many times --batch-size items per step: their requests are sorted by
# length across the step, so batches pad less (the choice phase ran ~1.5x faster for it).
SCORING_STEP = 16


@dataclass
class RunOptions:
    output: Path | None = None
    batch_size: int = 8  # prompts per generation call; sequences per scoring batch = 4x this
    progress: bool = True


def run_id(task: Task, model_name: str | None, tokenizer: str | None) -> str:
    """A short fingerprint of everything that decides an item's record (not the data's location or limit)."""
    settings = {
        "kind": task.kind, "model": model_name, "template": task.template, "input": task.input_field,
        "prompt_format": task.prompt_format, "truncate": task.truncate, "generation": task.generation,
        "metrics": list(task.metric_names), "tokenizer": tokenizer, "reference": task.reference_field,
        "delimiter": task.delimiter if task.kind == "choice" else None, "choices": task.choices,
        "label": task.label_field,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


class Output:
    """The per-item JSONL: what an earlier run finished, and appending new records."""

    def __init__(self, path: Path | None, run: str):
        self.path, self.run, self.done = path, run, {}
        if path is None or not path.exists():
            return
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a record torn by an interrupted write: drop it, it is redone
            with path.open("r+b") as f:
                f.truncate(end)
        for lineno, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record["key"]
            except (ValueError, KeyError, TypeError):
                raise ToolboxError(f"{path} line {lineno}: not an eval record; use a new --output file") from None
            if record.get("run") != run:
                raise ToolboxError(
                    f"{path} line {lineno}: written by a run with other settings (model, template, generation, "
                    "metrics or metric tokenizer); use a new --output file to keep both"
                )
            self.done[json.dumps(key)] = record

    def has(self, item: Item) -> bool:
        return json.dumps(item.key) in self.done

    def get(self, item: Item) -> dict | None:
        return self.done.get(json.dumps(item.key))

    def open(self):
        if self.path is None:
            return _NoFile()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path.open("a", encoding="utf-8")


class _NoFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass


class Meter:
    """The progress bar: items, tokens per second, time left (on stderr, only on a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.tokens, self.started = 0, time.perf_counter()
        self._bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self._bar = Progress(
                    TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("items"),
                    TextColumn("{task.fields[rate]} tokens/s"), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, transient=True,
                )
                self._task = self._bar.add_task(label, total=total, rate="-")

    def __enter__(self):
        if self._bar:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)
        return False

    def advance(self, items: int, tokens: int) -> None:
        self.tokens += tokens
        if self._bar:
            rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
            self._bar.update(self._task, advance=items, rate=f"{rate:,.0f}")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class RunResult:
    records: list[dict]  # one per item, in item order
    new: int  # made by this run (the rest were in the output already)
    tokens: int  # generated (generate) or scored (choice, perplexity) by this run
    elapsed: float
    tokenizer: object = None  # the MetricTokenizer of a generation run


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run(task: Task, items: list[Item], model: EvalModel | None, options: RunOptions) -> RunResult:
    """Evaluate `items` (a validated, shuffled, limited list) and return a record per item."""
    tokenizer = None
    if task.kind == "generate":
        tokenizer = pick_tokenizer(task.metric_tokenizer, (i.reference for i in items))
    run_key = run_id(task, model.name if model else "predictions", tokenizer.name if tokenizer else None)
    output = Output(options.output, run_key)
    todo = [i for i in items if not output.has(i)]
    made: dict[str, dict] = {}
    step = {"generate": _generate, "choice": _choice, "perplexity": _perplexity}[task.kind]
    scorer = TextScorer(tokenizer, task.metric_names) if tokenizer else None
    label = {"generate": "generating", "choice": "scoring choices", "perplexity": "scoring"}[task.kind]
    with Meter(len(todo), label, options.progress and model is not None) as meter, output.open() as out:
        step_items = options.batch_size * (1 if task.kind == "generate" else SCORING_STEP)
        for batch in _batches(todo, step_items):
            records, tokens = step(task, batch, model, scorer)
            for item, record in zip(batch, records):
                record = {"key": item.key, "where": item.where, **record, "run": run_key}
                made[json.dumps(item.key)] = record
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            meter.advance(len(batch), tokens)
    records = [made.get(json.dumps(i.key)) or output.get(i) for i in items]
    return RunResult(records, len(made), meter.tokens, meter.elapsed, tokenizer)


def _generate(task: Task, batch: list[Item], model: EvalModel | None, scorer: TextScorer):
    if model is None:  # --predictions: the predictions were made elsewhere
        outputs, tokens = [(i.prediction, None, None) for i in batch], 0
    else:
        outputs, tokens = model.generate([i.prompt for i in batch], [i.where for i in batch], task.generation,
                                         task.prompt_format, task.truncate)
    records = []
    for item, (text, count, finish) in zip(batch, outputs):
        values, stats = scorer.score(text, item.reference)
        record = {"input": item.input}
        if item.prompt is not None:
            record["prompt"] = item.prompt
        record.update(prediction=text, reference=item.reference, metrics=values, stats=stats,
                      tokenizer=scorer.tokenizer.name)
        if count is not None:
            record["tokens"] = count
        if finish is not None:
            record["finish_reason"] = finish
        records.append(record)
    return records, tokens


def _choice(task: Task, batch: list[Item], model: EvalModel, _scorer):
    pairs = [(item.prompt, task.delimiter + c) for item in batch for c in item.choices]
    wheres = [f"{item.where}: choice {k}" for item in batch for k in range(len(item.choices))]
    results = model.loglikelihood(pairs, wheres)
    records, at = [], 0
    for item in batch:
        lls = [r[0] for r in results[at : at + len(item.choices)]]
        at += len(item.choices)
        r = choice_result(lls, item.choices, item.label)
        records.append({"input": item.input, "prompt": item.prompt, "choices": item.choices, "label": item.label,
                        "loglikelihoods": lls, "pred": r["pred"], "pred_norm": r["pred_norm"],
                        "metrics": {m: r[m] for m in task.metric_names}})
    return records, sum(r[2] for r in results)


def _perplexity(task: Task, batch: list[Item], model: EvalModel, _scorer):
    records, tokens = [], 0
    for item, (nll, count) in zip(batch, model.score([i.text for i in batch])):
        ppl = float("nan") if count == 0 else _exp(nll / count)
        records.append({"chars": len(item.text), "tokens": count, "nll": nll,
                        "metrics": {"ppl": ppl}, "stats": {"ppl": [nll, count]}})
        tokens += count
    return records, tokens


def _exp(x: float) -> float:
    import math

    return math.exp(x) if x < 700 else float("inf")
