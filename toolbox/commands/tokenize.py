"""`toolbox tokenize`: text -> pieces, ids or JSON, one output line per input line."""

from __future__ import annotations

import json

import click

from toolbox.commands.options import (
    errors_option,
    load_tokenizer,
    model_options,
    nl_option,
    stdin_bytes,
    stdin_unbuffered,
    stdout_bytes,
)
from toolbox.forkpool import ordered_map
from toolbox.prompts import NL, to_model_text
from toolbox.textio import Output, decode_block, encode_lines, iter_line_blocks, read_whole

BLOCK = 128 << 10  # small enough that both worker processes start (and finish) at about the same time


@click.command()
@click.argument("text", required=False)
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(["pieces", "ids", "json"]),
    default="pieces",
    show_default=True,
    help="pieces and ids are space-separated; json gives ids, pieces and UTF-8 byte spans.",
)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--whole", is_flag=True, help="Treat all of stdin as one text (line ends kept).")
@click.option("--bos", is_flag=True, help="Prepend the BOS token.")
@click.option("--eos", is_flag=True, help="Append the EOS token.")
@click.option("--parse-special", is_flag=True, help="Read literals such as </s> in the text as special tokens.")
@nl_option
@errors_option
@model_options
def tokenize(text, fmt, as_json, whole, bos, eos, parse_special, nl, errors, model, revision):
    """Tokenize TEXT, or stdin line by line (streaming), with sentencepiece.

    Each input line gives one output line, written as soon as the line is read, so
    `tail -f log | toolbox tokenize` works. Line ends (LF or CRLF) are not part of
    a line's text; with --whole they are kept.

    \b
    Examples:
      toolbox tokenize "吾輩は猫である。"
      toolbox tokenize --format ids < novel.txt > ids.txt
      printf '質問\\n答え' | toolbox tokenize --whole --nl
    """
    tok = load_tokenizer(model, revision)
    encode, render = _stages(tok, "json" if as_json else fmt, bos=bos, eos=eos, parse_special=parse_special, nl=nl)
    out = Output(stdout_bytes())
    if text is not None:
        out.write_lines(render(encode([text])))
    elif whole:
        out.write_lines(render(encode([read_whole(stdin_bytes(), errors)])))
    else:
        def block_output(block):  # -> (output bytes of its good lines, error of its bad line)
            lines, error = decode_block(*block, errors)
            return encode_lines(render(encode(lines))), error

        def single_threaded():
            tok.threads = 1  # each worker process encodes on one core

        blocks = iter_line_blocks(stdin_unbuffered(), BLOCK)  # read on a prefetch thread
        for data, error in ordered_map(
            block_output, blocks, processes=tok.threads, size=lambda b: len(b[1]), initializer=single_threaded
        ):
            out.write(data)
            if error is not None:
                raise error


def _stages(tok, fmt, *, bos, eos, parse_special, nl):
    """Two functions: a batch of input texts -> encodings, and encodings -> output lines."""
    if fmt == "json":
        def encode(texts):
            return [_json_record(tok, t, bos, eos, parse_special, nl) for t in texts]

        return encode, lambda records: [json.dumps(r, ensure_ascii=False) for r in records]

    names = [str(i) if fmt == "ids" else tok.id_to_piece(i) for i in range(tok.vocab_size)]

    def encode(texts):
        if nl:
            texts = [to_model_text(t) for t in texts]
        return tok.encode_batch(texts, bos=bos, eos=eos, parse_special=parse_special)

    return encode, lambda batch: [" ".join([names[i] for i in ids]) for ids in batch]


def _json_record(tok, text, bos, eos, parse_special, nl) -> dict:
    tokens = tok.tokens(to_model_text(text) if nl else text, bos=bos, eos=eos, parse_special=parse_special)
    to_byte = _byte_offsets(text, nl)
    return {
        "ids": [t.id for t in tokens],
        "pieces": [t.piece for t in tokens],
        "spans": [[to_byte[t.start], to_byte[t.end]] for t in tokens],
    }


def _byte_offsets(text: str, nl: bool) -> list[int]:
    """UTF-8 byte offset in `text` of each character offset in the text the model saw.

    Under --nl each newline became the longer `<NL>`: its offsets map to the newline.
    """
    offsets = []
    pos = 0
    for ch in text:
        offsets.extend([pos] * (len(NL) if nl and ch == "\n" else 1))
        pos += len(ch.encode("utf-8"))
    offsets.append(pos)
    return offsets
