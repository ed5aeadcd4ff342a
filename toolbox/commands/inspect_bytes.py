"""`toolbox inspect-bytes`: how a text maps to pieces, and where byte fallback takes over."""

from __future__ import annotations

import io
import json

import click

from toolbox.byteinspect import FALLBACK, CorpusSummary, inspect_text
from toolbox.commands.options import errors_option, load_tokenizer, model_options, stdin_bytes
from toolbox.errors import ToolboxError
from toolbox.textio import iter_line_batches, read_whole


@click.command("inspect-bytes")
@click.argument("text", required=False)
@click.option("--file", "file", type=click.File("rb"), help="Read the text from a file ('-' for stdin).")
@click.option("--summary", is_flag=True, help="Only the totals: fallback rate and the most frequent fallback characters.")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True,
              help="Fallback characters listed by --summary.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--compare-hf", is_flag=True, help="Also encode with transformers' tokenizer and show where it disagrees.")
@errors_option
@model_options
def inspect_bytes(text, file, summary, top, as_json, compare_hf, errors, model, revision):
    """Show each character run -> pieces -> ids, with byte-fallback runs grouped.

    Byte-fallback pieces (`<0xNN>`) are grouped under the character they encode,
    with its code point and Unicode name; segments the normalizer changed are
    marked. A summary gives vocabulary versus byte-fallback coverage, tokens per
    character and whether detokenize(tokenize(text)) == text.

    Reads TEXT, else --file, else all of stdin.

    \b
    Examples:
      toolbox inspect-bytes "寿司🍣ｱ"
      toolbox inspect-bytes --file novel.txt --summary
    """
    if text is not None and file is not None:
        raise click.UsageError("give TEXT or --file, not both")
    tok = load_tokenizer(model, revision)
    stream = file or stdin_bytes()
    source = getattr(file, "name", "stdin")
    if summary:
        lines = io.BytesIO(text.encode("utf-8")) if text is not None else stream
        _print_summary(tok, lines, errors, "argument" if text is not None else source, top, as_json)
        return
    if text is None:
        text = read_whole(stream, errors, source)
    report = inspect_text(tok, text)
    hf = _compare_hf(tok, text) if compare_hf else None
    if as_json:
        data = report.to_dict()
        if hf is not None:
            data["compare_hf"] = hf
        click.echo(json.dumps(data, ensure_ascii=False))
    else:
        _render(tok, report, hf)


def _print_summary(tok, stream, errors, source, top, as_json):
    total = CorpusSummary()
    for batch in iter_line_batches(stream, errors, source):
        for _, line in batch:
            total.add(inspect_text(tok, line))
    data = total.to_dict(top)
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"{data['lines']} lines, {data['characters']} characters, {data['tokens']} tokens "
        f"({data['tokens_per_character']} per character); byte fallback: "
        f"{data['byte_fallback_characters']} characters = [bold]{data['fallback_rate']:.4%}[/bold]; "
        f"round-trip failures: {data['roundtrip_failures']}"
    )
    if data["top_fallback"]:
        table = Table("char", "code point", "name", "count", title="most frequent byte-fallback characters")
        for row in data["top_fallback"]:
            table.add_row(row["char"], row["codepoint"], row["name"], str(row["count"]))
        console.print(table)


def _visible(text: str) -> str:
    return text.replace(" ", "␣").replace("\t", "⇥").replace("\r", "␍").replace("\n", "␤")


def _render(tok, report, hf):
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table("text", "pieces", "ids", "note", title=f"{tok.path.parent.name}/{tok.path.name}")
    for seg in report.segments:
        note = []
        if seg.kind == FALLBACK:
            note.append("[yellow]byte fallback[/yellow] " + ", ".join(f"{c['codepoint']} {c['name']}" for c in seg.characters))
        elif seg.kind != "piece":
            note.append(f"[magenta]{seg.kind}[/magenta]")
        if seg.normalized is not None:
            note.append(f"[cyan]normalized[/cyan] {escape(_visible(seg.text))} → {escape(_visible(seg.normalized))}")
        table.add_row(
            escape(_visible(seg.text)),
            escape(" ".join(seg.pieces)),
            " ".join(map(str, seg.ids)),
            "; ".join(note),
            style="yellow" if seg.kind == FALLBACK else None,
        )
    console.print(table)
    s = report.summary()
    console.print(
        f"{s['characters']} characters: {s['vocabulary_characters']} in the vocabulary, "
        f"{s['byte_fallback_characters']} by byte fallback, {s['unknown_characters']} unknown; "
        f"{s['tokens']} tokens ({s['tokens_per_character']} per character); "
        f"normalization ({tok.settings['normalization']}) changed {s['normalized_segments']} segments; "
        f"round trip: {'[green]exact[/green]' if s['roundtrip'] else '[red]differs[/red]'}"
    )
    if hf is not None:
        if hf["agree"]:
            console.print("transformers' tokenizer: [green]same ids[/green]")
        else:
            console.print(
                f"transformers' tokenizer ({hf['class']}): [red]differs[/red] from token {hf['first_difference']}\n"
                f"  sentencepiece: {escape(' '.join(hf['sentencepiece_pieces']))}\n"
                f"  transformers:  {escape(' '.join(hf['transformers_pieces']))}"
            )


def _compare_hf(tok, text) -> dict:
    """Encode with transformers' AutoTokenizer(use_fast=False) as the model cards say, and compare."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ToolboxError("--compare-hf needs transformers: pip install transformers") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(tok.path.parent), use_fast=False)
    except (OSError, ValueError):
        # No tokenizer_config.json: use the class the series' checkpoints declare.
        from transformers import T5Tokenizer

        try:
            hf = T5Tokenizer.from_pretrained(str(tok.path.parent))
        except (OSError, ValueError) as exc:
            raise ToolboxError(f"--compare-hf: transformers cannot load {tok.path.parent}: {exc}") from None
    theirs = hf.encode(text, add_special_tokens=False)
    ours = tok.encode(text)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    return {
        "class": type(hf).__name__,
        "agree": first is None,
        "first_difference": first,
        "sentencepiece_ids": ours,
        "transformers_ids": theirs,
        "sentencepiece_pieces": [tok.id_to_piece(i) for i in ours],
        "transformers_pieces": hf.convert_ids_to_tokens(theirs),
    }
