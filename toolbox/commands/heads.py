"""`toolbox classify` and `toolbox tag`: run a fine-tuned head over lines of text."""

from __future__ import annotations

import json

import click

from toolbox.commands.options import errors_option, model_options, stdin_bytes, stdout_bytes
from toolbox.textio import iter_line_batches


def head_options(func):
    for option in reversed([
        click.option("--json", "as_json", is_flag=True, help="One JSON object per line of input."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Lines per forward pass."),
        errors_option,
        click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Compute dtype (default: float32 on the CPU, bfloat16 on CUDA)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads."),
    ]):
        func = option(func)
    return model_options(func)


def _lines(texts: tuple[str, ...], errors: str):
    """Batches of (line number, text, name for errors): the arguments, else the non-empty lines of stdin."""
    if texts:
        yield [(n, text, f"argument {n}") for n, text in enumerate(texts, 1)]
        return
    for batch in iter_line_batches(stdin_bytes(), errors):
        kept = [(n, line, f"stdin line {n}") for n, line in batch if line.strip()]
        if kept:
            yield kept


def _load(model, revision, device, dtype, threads, batch_size):
    from toolbox.heads import load

    return load(model, device=device, dtype=dtype, threads=threads, revision=revision, batch_size=batch_size)


def _write_json(records) -> None:
    out = stdout_bytes()
    out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    out.flush()


@click.command()
@click.argument("texts", nargs=-1)
@click.option("--all-labels", is_flag=True, help="Show every label's probability, not just the best.")
@head_options
def classify(texts, all_labels, as_json, batch_size, errors, device, dtype, threads, model, revision):
    """Label each TEXT (or each line of stdin) with a `toolbox finetune classify` model.

    Prints a table of line, label and probability, or with --json one object per line:
    {"line", "text", "label", "score", "scores"}.

    \b
    Example:
      toolbox classify --model out/novels "吾輩は猫である。" "I am a cat."
    """
    from rich.table import Table

    from toolbox.heads import classify as run_classify

    def table(batch, results):
        out = Table("line", "text", "label", "probability", *(["all"] if all_labels else []))
        for (n, text, _), r in zip(batch, results):
            extra = [", ".join(f"{k} {v:.3f}" for k, v in r.scores.items())] if all_labels else []
            out.add_row(str(n), text, r.label, f"{r.score:.3f}", *extra)
        return out

    _answer(texts, errors, _load(model, revision, device, dtype, threads, batch_size), run_classify, as_json, table)


@click.command()
@click.argument("texts", nargs=-1)
@head_options
def tag(texts, as_json, batch_size, errors, device, dtype, threads, model, revision):
    """Find the entities in each TEXT (or each line of stdin) with a `toolbox finetune tag` model.

    Prints a table of entities (type, character span, text, probability), or with --json
    one object per line: {"line", "text", "entities": [{"start", "end", "label", "text", "score"}]};
    start and end are character offsets into the line.

    \b
    Example:
      toolbox tag --model out/ner "山田さんは京都へ行った。"
    """
    from rich.table import Table

    from toolbox.heads import tag as run_tag

    def table(batch, results):
        out = Table("line", "label", "span", "entity", "probability")
        for (n, *_), r in zip(batch, results):
            if not r.entities:
                out.add_row(str(n), "-", "", "(none)", "")
            for e in r.entities:
                out.add_row(str(n), e.label, f"{e.start}-{e.end}", e.text, f"{e.score:.3f}")
        return out

    _answer(texts, errors, _load(model, revision, device, dtype, threads, batch_size), run_tag, as_json, table)


def _answer(texts, errors, runner, run, as_json: bool, table) -> None:
    """Run the head over the input in batches; print JSON lines, or each batch's `table(batch, results)`."""
    from rich.console import Console

    console = Console(highlight=False)
    for batch in _lines(texts, errors):
        results = run(runner, [text for _, text, _ in batch], sources=[where for *_, where in batch])
        if as_json:
            _write_json({"line": n, **r.to_dict()} for (n, *_), r in zip(batch, results))
        else:
            console.print(table(batch, results))
