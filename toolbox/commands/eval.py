"""`toolbox eval`: evaluate a model on a dataset (generation, multiple choice, perplexity),
run a saved task or lm-evaluation-harness tasks, and compare two runs item by item."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import click

from toolbox.commands.options import model_load_options
from toolbox.errors import ToolboxError


class EvalGroup(click.Group):
    """Subcommands' `ToolboxError`s become click's one-line `Error:` with exit status 1, whether
    this group runs under `toolbox` or on its own."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ToolboxError as exc:
            raise click.ClickException(str(exc)) from None


@click.group("eval", cls=EvalGroup)
def eval_group():
    """Evaluate a model on a dataset: generation metrics (ROUGE, BLEU, chrF, exact match) with a
    tokenization right for Japanese, multiple-choice accuracy, perplexity.

    \b
    Examples:
      toolbox eval generate --data news.jsonl --template "{article}\\n要約:" --reference-field summary
      toolbox eval generate --predictions preds.jsonl --reference-field summary
      toolbox eval choice --data qa.jsonl --template "{question}" --choices-field choices --label-field label
      toolbox eval perplexity --data texts.jsonl --text-field text
      toolbox eval run xlsum_ja --limit 100 --output run.jsonl
      toolbox eval compare run_a.jsonl run_b.jsonl
      toolbox eval harness hellaswag --limit 50
    """


# -- options -------------------------------------------------------------------------


def _options(*options):
    def attach(func):
        for option in reversed(options):
            func = option(func)
        return func

    return attach


data_options = _options(
    click.option("--data", "data", type=click.Path(dir_okay=False), help="Local data: .jsonl, .csv, .tsv or .parquet."),
    click.option("--dataset", help="Hugging Face dataset NAME[:CONFIG] (cache first; HF_DATASETS_OFFLINE respected)."),
    click.option("--split", help="Dataset split.  [default: test]"),
    click.option("--id-field", help="A field with a stable id per record (default: the record's position)."),
    click.option("--limit", type=click.IntRange(min=1), help="Evaluate the first N items (after --shuffle)."),
    click.option("--shuffle", is_flag=True, default=None, help="Shuffle the items (with --seed) before --limit."),
    click.option("--skip-invalid", is_flag=True, help="Skip invalid records, counting and reporting them."),
)
run_options = _options(
    click.option("--output", type=click.Path(dir_okay=False), help="Per-item JSONL; rerunning skips finished items."),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    click.option("--seed", type=int, help="Seed for --shuffle, the bootstrap and sampling.  [default: 0]"),
    click.option("--bootstrap", "resamples", type=click.IntRange(min=0), default=1000, show_default=True,
                 help="Bootstrap resamples for the 95% intervals (0: none)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Prompts per generation call; scoring batches 4x as many sequences."),
)
endpoint_options = _options(
    click.option("--endpoint", metavar="URL",
                 help="Evaluate an OpenAI-compatible server (toolbox serve, vLLM) instead of a local model."),
    click.option("--endpoint-model", metavar="NAME", help="The model name to send to --endpoint."),
    click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer token for --endpoint [env OPENAI_API_KEY]."),
)
generation_options = _options(
    click.option("--max-new-tokens", type=click.IntRange(min=1),
                 help="Tokens to generate at most (default: the task's, else the model's)."),
    click.option("--temperature", type=click.FloatRange(min=0), help="Sampling temperature.  [default: 0, greedy]"),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling mass."),
    click.option("--top-k", type=click.IntRange(min=0), help="Sample among the k most likely tokens."),
    click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), help="> 1 discourages repeats."),
    click.option("--stop", multiple=True, help="Stop at this string (repeatable)."),
    click.option("--prompt-format", type=click.Choice(["auto", "plain", "rinna-chat"]),
                 help="auto: the instruction template for the sft/ppo variants.  [default: auto]"),
    click.option("--truncate", type=click.Choice(["error", "left"]),
                 help="A prompt too long for the context: error, or keep its last tokens.  [default: error]"),
)
text_metric_options = _options(
    click.option("--reference-field", help="The field holding the reference text."),
    click.option("--metric", "metrics", multiple=True,
                 type=click.Choice(["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "exact_match"]),
                 help="Metric to report (repeatable).  [default: all]"),
    click.option("--metric-tokenizer", type=click.Choice(["auto", "mecab", "char", "whitespace"]),
                 help="Words for ROUGE and BLEU: auto = MeCab for Japanese (characters without MeCab), "
                      "words otherwise.  [default: auto]"),
)
prompt_options = _options(
    click.option("--template", help="Prompt over the record's fields, e.g. '{article}\\n要約:' (Python str.format)."),
    click.option("--input-field", help="The field that is the prompt (when there is no --template)."),
)

GENERATION_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop")


def _unescape(template: str | None) -> str | None:
    """`\\n` and `\\t` typed on a command line mean a newline and a tab."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")


def _apply(task, opts: dict):
    """The task with every option the user gave put over its settings."""
    generation = dict(task.generation)
    for name in GENERATION_OPTIONS:
        value = opts.pop(name, None)
        if value not in (None, ()):
            generation[name] = list(value) if name == "stop" else value
    if generation.get("temperature", 0) > 0 and (opts.get("seed") is not None or "seed" not in generation):
        generation["seed"] = opts["seed"] if opts.get("seed") is not None else task.seed  # sampling: reproducible
    changes = {"generation": generation}
    names = {f.name for f in dataclasses.fields(task)}
    for name, value in opts.items():
        if name in names and value not in (None, ()):
            changes[name] = list(value) if isinstance(value, tuple) else value
    if "template" in changes:
        changes["template"] = _unescape(changes["template"])
    if "delimiter" in changes:
        changes["delimiter"] = _unescape(changes["delimiter"])
    if opts.get("data"):
        changes["dataset"] = None
    elif opts.get("dataset"):
        changes["data"] = None
    return dataclasses.replace(task, **changes)


def _clean(value):
    """JSON without NaN/Infinity (not JSON): such values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _model(opts: dict, workload: str = "short"):
    """The model to evaluate: an endpoint, or a local model (`ModelChoice.load`)."""
    if opts.get("endpoint"):
        from toolbox.eval.endpoint import Endpoint

        return Endpoint(opts["endpoint"], opts.get("endpoint_model"), opts.get("api_key"))
    from toolbox.eval.runner import LocalModel

    return LocalModel(opts["choice"].load(workload), opts.get("batch_size") or 8)


def _execute(task, opts: dict, predictions: str | None = None) -> None:
    from toolbox.eval import data as datamod
    from toolbox.eval import report, runner
    from toolbox.eval.tasks import item_builder

    task.check(predictions=bool(predictions))
    if not predictions and not opts.get("endpoint"):
        opts["choice"].check()
    if predictions:
        source, label = datamod.read_file(predictions), predictions
    elif task.data:
        source, label = datamod.read_file(task.data), task.data
    elif task.dataset:
        source, label = datamod.read_dataset(task.dataset, task.split), f"{task.dataset} split {task.split}"
    else:
        raise ToolboxError(f"task {task.name}: no data (--data FILE or --dataset NAME)")
    loaded = datamod.load(source, label, item_builder(task, predictions=bool(predictions)), task.limit,
                          bool(task.shuffle), task.seed, bool(opts.get("skip_invalid")))
    if not loaded.items:
        raise ToolboxError(f"{label}: no items to evaluate ({loaded.total} records, {loaded.invalid} invalid)")
    model = None if predictions else _model(opts, "generate" if task.kind == "generate" else "score")
    output = Path(opts["output"]) if opts.get("output") else None
    result = runner.run(task, loaded.items, model, runner.RunOptions(output, opts.get("batch_size") or 8))
    name = model.name if model else f"predictions from {predictions}"
    summary = report.summarize(task, loaded, result, name, output, opts.get("resamples", 1000), task.seed)
    for message in loaded.skipped[:5]:
        click.echo(f"skipped: {message}", err=True)
    if loaded.invalid > 5:
        click.echo(f"skipped: ... {loaded.invalid - 5} more", err=True)
    if opts.get("as_json"):
        click.echo(json.dumps(_clean(summary), ensure_ascii=False, indent=2))
    else:
        report.print_summary(summary)


def _task(kind: str, opts: dict):
    from toolbox.eval.tasks import Task

    return _apply(Task(name=kind, kind=kind), dict(opts))


# -- commands ------------------------------------------------------------------------


@eval_group.command()
@data_options
@prompt_options
@text_metric_options
@click.option("--predictions", type=click.Path(dir_okay=False),
              help="Score predictions made elsewhere: a JSONL/CSV/Parquet of records with the prediction beside "
                   "the data's fields (no model is loaded).")
@click.option("--prediction-field", help="The prediction's field in --predictions.  [default: prediction]")
@generation_options
@run_options
@endpoint_options
@model_load_options
def generate(predictions, **opts):
    """Generate for each record and score against its reference: ROUGE-1/2/L/Lsum, BLEU, chrF, exact match.

    ROUGE counts words from --metric-tokenizer (MeCab for Japanese by default), BLEU uses
    sacrebleu with the matching tokenization (ja-mecab, char or 13a), chrF is sacrebleu's.
    The summary gives each metric with a bootstrap 95% interval and names the tokenizer used.
    """
    if predictions and (opts.get("data") or opts.get("dataset")):
        raise click.UsageError("--predictions is the data (with a prediction field); leave out --data/--dataset")
    task = _task("generate", opts)
    _execute(task, opts, predictions)


@eval_group.command()
@data_options
@prompt_options
@click.option("--choices-field", help="A field with the list of choices, or several fields joined by commas.")
@click.option("--choice", "choices", multiple=True,
              help="A fixed choice for every item (repeatable), e.g. JNLI's labels.")
@click.option("--label-field", help="The right choice: its index (from 0) or its text.")
@click.option("--delimiter", help="Between the context and each choice (\\n for a newline).  [default: ' ']")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(["acc", "acc_norm"]),
              help="Metric to report (repeatable).  [default: both]")
@run_options
@endpoint_options
@model_load_options
def choice(**opts):
    """Multiple choice by log-likelihood: each choice scored after the context (the template).

    acc picks the choice with the highest log-likelihood; acc_norm the highest per character
    of the choice, as lm-evaluation-harness defines them.
    """
    _execute(_task("choice", opts), opts)


@eval_group.command()
@data_options
@click.option("--text-field", "input_field", help="The field whose text is scored.")
@run_options
@endpoint_options
@model_load_options
def perplexity(**opts):
    """Perplexity of a text field over a dataset (token-weighted, with a bootstrap 95% interval)."""
    _execute(_task("perplexity", opts), opts)


@eval_group.command()
@click.argument("task_spec", metavar="TASK", required=False)
@data_options
@prompt_options
@text_metric_options
@generation_options
@run_options
@endpoint_options
@model_load_options
def run(task_spec, **opts):
    """Run a saved task: a built-in name or a YAML/TOML file; options override its settings.

    Without TASK, list the built-in tasks. A task file holds the settings of the other
    commands by their long names (kind, data or dataset, split, template, input_field,
    reference_field, choices_field, label_field, metrics, metric_tokenizer, generation, ...).
    """
    from toolbox.eval.tasks import BUILTIN, load_task

    if task_spec is None:
        for name, spec in BUILTIN.items():
            click.echo(f"{name}\t{spec['kind']}\t{spec['description']}")
        return
    task = _apply(load_task(task_spec), opts)
    _execute(task, opts)


@eval_group.command()
@click.argument("run_a", type=click.Path(dir_okay=False))
@click.argument("run_b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the paired bootstrap.")
@click.option("--bootstrap", "resamples", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Paired bootstrap resamples (0: none).")
def compare(run_a, run_b, as_json, seed, resamples):
    """Compare two runs (their --output files) on the items both have: per metric A, B, B - A
    with a paired bootstrap 95% interval, and how many items B wins, ties and loses."""
    from toolbox.eval import report

    result = report.compare(run_a, run_b, resamples, seed)
    if as_json:
        click.echo(json.dumps(_clean(result), ensure_ascii=False, indent=2))
    else:
        report.print_compare(result)


@eval_group.command()
@click.argument("tasks", nargs=-1, required=True)
@click.option("--include-path", type=click.Path(file_okay=False, exists=True),
              help="A directory of your own lm-eval task YAML files.")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Few-shot examples per prompt (default: the task's).")
@click.option("--limit", type=float, help="Documents per task (a fraction below 1: that share of them).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences per model call.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for few-shot sampling and generation.")
@click.option("--apply-chat-template", is_flag=True, help="Wrap prompts in the model's chat template (sft/ppo).")
@click.option("--log-samples", is_flag=True, help="Keep every document's requests and responses in --output.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write lm-eval's results (JSON) here.")
@click.option("--json", "as_json", is_flag=True, help="Print lm-eval's results as JSON.")
@model_load_options
def harness(tasks, include_path, num_fewshot, limit, batch_size, seed, apply_chat_template, log_samples, output,
            as_json, choice):
    """Run lm-evaluation-harness TASKS (names, comma lists or YAML files) on a toolbox model.

    The model is lm-eval's "toolbox" model: lm-eval's own requests (log-likelihoods, rolling
    log-likelihoods, generation) go through the toolbox backend, so results equal lm-eval's
    `hf` model on the same checkpoint. Datasets come through Hugging Face `datasets` (its
    cache and HF_DATASETS_OFFLINE apply).
    """
    names = [t for arg in tasks for t in arg.split(",") if t]
    choice.check()
    from toolbox.eval.harness import run_harness

    results = run_harness(choice.load(), names, num_fewshot=num_fewshot, limit=limit, include_path=include_path,
                          batch_size=batch_size, seed=seed, apply_chat_template=apply_chat_template,
                          log_samples=log_samples)
    if results is None:
        raise ToolboxError("lm-eval returned no results")
    if output:
        Path(output).write_text(json.dumps(results, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    if as_json:
        click.echo(json.dumps(_clean(results["results"]), ensure_ascii=False, indent=2, default=str))
    else:
        from lm_eval.utils import make_table

        click.echo(make_table(results))
