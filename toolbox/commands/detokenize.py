"""`toolbox detokenize`: ids or pieces -> text, one output line per input line."""

from __future__ import annotations

import json
import re

import click

from toolbox.commands.options import errors_option, load_tokenizer, model_options, nl_option, stdin_bytes, stdout_bytes
from toolbox.errors import ToolboxError
from toolbox.prompts import from_model_text
from toolbox.textio import Output, iter_line_batches

IDS_LINE = re.compile(r"\s*-?\d+(?:\s*[,\s]\s*-?\d+)*\s*,?\s*")
ID = re.compile(r"-?\d+")


@click.command()
@click.argument("tokens", required=False)
@click.option(
    "--from",
    "kind",
    type=click.Choice(["auto", "ids", "pieces"]),
    default="auto",
    show_default=True,
    help="What the input holds; auto reads a line of integers as ids, anything else as pieces.",
)
@nl_option
@errors_option
@model_options
def detokenize(tokens, kind, nl, errors, model, revision):
    """Turn TOKENS, or each line of stdin, back into text.

    Ids may be space- or comma-separated or a JSON array; pieces are separated by
    single spaces (as `toolbox tokenize` prints them) or given as a JSON array of
    strings. An id outside the vocabulary or an unknown piece stops with an error
    naming the line.

    \b
    Examples:
      toolbox detokenize "1070 342 3215"
      toolbox tokenize --format ids < a.txt | toolbox detokenize
    """
    tok = load_tokenizer(model, revision)
    out = Output(stdout_bytes())
    if tokens is not None:
        out.write_lines([_decode_line(tok, tokens, kind, nl, "argument")])
        return
    for batch in iter_line_batches(stdin_bytes(), errors):
        lines = []
        try:
            for lineno, line in batch:
                lines.append(_decode_line(tok, line, kind, nl, f"stdin line {lineno}"))
        finally:
            out.write_lines(lines)  # keep every good line before a bad one


def _decode_line(tok, line: str, kind: str, nl: bool, where: str) -> str:
    try:
        ids = _parse(tok, line, kind)
        text = tok.decode(ids)
    except ValueError as exc:
        raise ToolboxError(f"{where}: {exc}") from None
    return from_model_text(text) if nl else text


def _parse(tok, line: str, kind: str) -> list[int]:
    if not line.strip():
        return []
    if line.lstrip().startswith("["):
        try:
            items = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON array ({exc.msg} at column {exc.colno})") from None
        if not isinstance(items, list):
            raise ValueError("expected a JSON array of ids or pieces")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in items) and kind != "pieces":
            return items
        if all(isinstance(x, str) for x in items) and kind != "ids":
            return tok.pieces_to_ids(items)
        want = {"auto": "ids or pieces"}.get(kind, kind)
        raise ValueError(f"expected a JSON array of {want}")
    if kind == "ids" or (kind == "auto" and IDS_LINE.fullmatch(line)):
        words = [w for w in re.split(r"[\s,]+", line.strip()) if w]
        bad = next((w for w in words if not ID.fullmatch(w)), None)
        if bad is not None:
            raise ValueError(f"{bad!r} is not a token id")
        return [int(w) for w in words]
    return tok.pieces_to_ids([p for p in line.split(" ") if p])
