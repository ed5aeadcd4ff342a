"""Render the CLI reference (docs/cli.md) from the commands' own --help.

Run `python -m toolbox.clidoc > docs/cli.md` after changing a command; a test keeps
the file in sync.
"""

from __future__ import annotations

import click

from toolbox.cli import cli

WIDTH = 88


def _walk(command: click.Command, path: list[str], parent: click.Context | None):
    settings = {"terminal_width": WIDTH, "max_content_width": WIDTH, **command.context_settings}
    ctx = click.Context(command, info_name=path[-1], parent=parent, **settings)
    yield path, command.get_help(ctx)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            yield from _walk(command.get_command(ctx, name), [*path, name], ctx)


def render() -> str:
    """The whole reference as Markdown (built-in commands only, whatever plugins are installed)."""
    parts = ["# CLI reference", "", "Generated from `--help` by `python -m toolbox.clidoc`; do not edit by hand.", ""]
    cli.plugin_commands = False
    try:
        for path, text in _walk(cli, ["toolbox"], None):
            parts += [f"## `{' '.join(path)}`", "", "```text", text.rstrip(), "```", ""]
    finally:
        cli.plugin_commands = True
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
