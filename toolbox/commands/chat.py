"""`toolbox chat`: an interactive conversation through the instruction template."""

from __future__ import annotations

import sys

import click

from toolbox.commands.options import build_params, errors_option, model_load_options, sampling_options

HELP = "/reset starts over, /exit (or Ctrl-D) quits"


@click.command()
@click.option("--system", "system", default=None, metavar="TEXT",
              help="Instructions put in front of the first user message of the conversation.")
@sampling_options
@errors_option
@model_load_options
def chat(system, errors, choice, **sampling):
    """Talk with an instruction model; the conversation so far is the prompt.

    Each turn goes through the series' template (ユーザー/システム utterances joined
    by <NL>); the oldest turns are dropped when the context fills. Type /reset to
    start over and /exit (or Ctrl-D) to quit. Lines may also come from a pipe.
    """
    from rich.console import Console

    console = Console(highlight=False)
    params = build_params(choice, **sampling)
    choice.check()
    model = choice.load()
    if params.max_new_tokens >= model.context_length:
        raise click.BadParameter(f"{params.max_new_tokens} leaves no room for the conversation in the model's "
                                 f"context of {model.context_length} tokens", param_hint="--max-new-tokens")
    if not model.chat_template:
        console.print(f"[yellow]note:[/yellow] {model.name} is not an instruction model; answers may ramble")
    console.print(f"[dim]{model.name} on {model.backend}; {HELP}[/dim]")
    lines = _Lines(console, errors)
    history: list[dict] = []
    while True:
        message = lines.read("[bold cyan]ユーザー>[/bold cyan] ")
        if message is None or message in ("/exit", "/quit"):
            return
        if message == "/reset":
            history.clear()
            console.print("[dim]conversation reset[/dim]")
            continue
        if not message:
            continue
        history.append({"role": "user", "content": message})
        preface = [{"role": "system", "content": system}] if system else []
        ids, dropped = model.chat_ids(preface + history, params.max_new_tokens)
        if dropped:
            del history[:dropped]
            console.print(f"[dim]({dropped} oldest turns dropped to fit the context)[/dim]")
        console.print("[bold magenta]システム>[/bold magenta] ", end="")
        answer = ""
        try:
            for event in model.events([ids], params, nl=True):
                answer += event.text
                console.out(event.text, end="", highlight=False)
                console.file.flush()
        except KeyboardInterrupt:
            console.print("[dim] (interrupted)[/dim]", end="")
        console.print()
        history.append({"role": "assistant", "content": answer})


class _Lines:
    """The user's lines: the console's line editor on a terminal, else stdin read as UTF-8 bytes
    (so that invalid input is a one-line error naming the line, not a traceback)."""

    def __init__(self, console, errors: str):
        self.console, self.errors, self.lineno = console, errors, 0
        self.tty = sys.stdin.isatty()

    def read(self, prompt: str) -> str | None:
        from toolbox.textio import decode_line

        self.lineno += 1
        if self.tty:
            try:
                return self.console.input(prompt).strip()
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return None
            except UnicodeDecodeError:
                self.console.print("[red]that line is not valid UTF-8; try again[/red]")
                return ""
        self.console.print(prompt, end="")
        raw = sys.stdin.buffer.readline()
        if not raw:
            self.console.print()
            return None
        return decode_line(raw.rstrip(b"\r\n"), self.lineno, self.errors).strip()
