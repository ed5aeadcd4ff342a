"""`toolbox backends`: the registered backends, whether they can run here, and their options."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON array of backends.")
def backends(as_json):
    """List backends with their availability (and why not, when unavailable) and their options.

    Options are set with `-o NAME=VALUE` on any model command (repeatable), else from
    their environment variable.
    """
    from toolbox.backends import registered

    rows = []
    for name, backend in registered().items():
        reason = backend.unavailable_reason()
        options = [{"name": o.name, "env": o.env, "default": o.default, "help": o.help} for o in backend.options]
        rows.append({"name": name, "available": reason is None, "reason": reason, "description": backend.description,
                     "options": options})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("backend", "available", "description", box=None, padding=(0, 2, 0, 0))
    for row in rows:
        status = "[green]yes[/green]" if row["available"] else f"[red]no[/red] ({row['reason']})"
        table.add_row(row["name"], status, row["description"])
        for o in row["options"]:
            where = ", ".join(x for x in (o["env"] and f"env {o['env']}", o["default"] and f"default {o['default']}")
                              if x)
            table.add_row("", "", f"[dim]-o {o['name']}=…  {o['help']}{f' ({where})' if where else ''}[/dim]")
    Console().print(table)
