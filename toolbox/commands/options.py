"""Options and helpers shared by several commands."""

from __future__ import annotations

import sys

import click

from toolbox.checkpoints import parse_model, tokenizer_file

model_option = click.option(
    "-m",
    "--model",
    envvar="TOOLBOX_MODEL",
    default=None,
    metavar="NAME|DIR",
    help="Registry id or alias, hub id, or checkpoint directory [env TOOLBOX_MODEL; default: embedded].",
)
revision_option = click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
errors_option = click.option(
    "--errors",
    type=click.Choice(["strict", "replace"]),
    default="strict",
    show_default=True,
    help="Invalid UTF-8 input: stop with an error, or replace with U+FFFD.",
)
nl_option = click.option(
    "--nl",
    is_flag=True,
    help="Instruction models' newline convention: newline in the text <-> <NL> token.",
)


def model_options(func):
    """Attach --model and --revision."""
    return model_option(revision_option(func))


def load_tokenizer(model: str | None, revision: str | None):
    """The sentencepiece tokenizer of the model named by --model."""
    from toolbox.tokenizer import Tokenizer

    return Tokenizer(tokenizer_file(parse_model(model, revision)))


def stdin_bytes():
    return sys.stdin.buffer


def stdin_unbuffered():
    """stdin below Python's buffer, for reading on a background thread: an exit while such a
    thread waits inside the buffered reader aborts the interpreter (it cannot take the
    reader's lock at shutdown). An in-memory stdin (click's test runner) is returned as is."""
    return getattr(sys.stdin.buffer, "raw", sys.stdin.buffer)


def stdout_bytes():
    return sys.stdout.buffer


def backend_options(func):
    """Attach --backend, --device, --dtype and --threads."""
    for option in reversed(
        [
            click.option(
                "-b", "--backend", default="auto", show_default=True, envvar="TOOLBOX_BACKEND",
                help="Backend name (see `toolbox backends`); auto = cuda if present, else cpu.",
            ),
            click.option("--device", default=None, help="Device, e.g. cpu, cuda, cuda:1 (default: the backend's)."),
            click.option(
                "--dtype", default=None,
                help="float32/bfloat16 (cpu), float16/bfloat16 (cuda), int8/int4 (quant).",
            ),
            click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads."),
        ]
    ):
        func = option(func)
    return func


def load_options(device, dtype, threads):
    from toolbox.backend import LoadOptions

    return LoadOptions(device=device, dtype=dtype, threads=threads)
