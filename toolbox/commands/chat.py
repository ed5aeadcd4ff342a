"""`toolbox chat`: an interactive conversation through the instruction template."""

from __future__ import annotations

import click

from toolbox.commands.generate import build_params, sampling_options
from toolbox.commands.options import backend_options, load_options, model_options
from toolbox.prompts import chat_prompt

HELP = "/reset starts over, /exit (or Ctrl-D) quits"


def fit_history(tokenizer, turns: list[tuple[str, str]], room: int) -> tuple[list[int], int]:
    """Prompt ids for `turns`, dropping the oldest exchanges until they fit in `room` tokens."""
    dropped = 0
    while True:
        ids = tokenizer.encode(chat_prompt(turns[dropped:]))
        if len(ids) <= room or dropped >= len(turns) - 1:
            return ids[-room:], dropped
        dropped += 2 if len(turns) - dropped > 2 else 1


@click.command()
@sampling_options
@backend_options
@model_options
def chat(backend, device, dtype, threads, model, revision, **sampling):
    """Talk with an instruction model; the conversation so far is the prompt.

    Each turn goes through the series' template (ユーザー/システム utterances joined
    by <NL>); the oldest turns are dropped when the context fills. Type /reset to
    start over and /exit (or Ctrl-D) to quit.
    """
    from rich.console import Console

    from toolbox.loader import load

    console = Console(highlight=False)
    loaded = load(model, revision, backend, load_options(device, dtype, threads))
    params = build_params(loaded, **sampling)
    if not loaded.chat_template:
        console.print(f"[yellow]note:[/yellow] {loaded.ref.name} is not an instruction model; answers may ramble")
    console.print(f"[dim]{loaded.ref.name} on {loaded.backend}; {HELP}[/dim]")
    history: list[tuple[str, str]] = []
    room = loaded.model.context_length - params.max_new_tokens
    while True:
        try:
            message = console.input("[bold cyan]ユーザー>[/bold cyan] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if message in ("/exit", "/quit"):
            return
        if message == "/reset":
            history.clear()
            console.print("[dim]conversation reset[/dim]")
            continue
        if not message:
            continue
        history.append(("user", message))
        ids, dropped = fit_history(loaded.model.tokenizer, history, room)
        if dropped:
            del history[:dropped]
            console.print(f"[dim]({dropped} oldest turns dropped to fit the context)[/dim]")
        console.print("[bold magenta]システム>[/bold magenta] ", end="")
        answer = ""
        try:
            for event in loaded.model.generate([ids], params, nl=True):
                answer += event.text
                console.out(event.text, end="", highlight=False)
                console.file.flush()
        except KeyboardInterrupt:
            console.print("[dim] (interrupted)[/dim]", end="")
        console.print()
        history.append(("assistant", answer))
