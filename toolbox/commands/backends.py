"""`toolbox backends`: the registered backends and whether they can run here."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON array of backends.")
def backends(as_json):
    """List backends with their availability (and why not, when unavailable)."""
    from toolbox.backend import backends as registered

    rows = []
    for name, backend in registered().items():
        reason = backend.unavailable_reason()
        rows.append({"name": name, "available": reason is None, "reason": reason, "description": backend.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("backend", "available", "description", box=None, padding=(0, 2, 0, 0))
    for row in rows:
        status = "[green]yes[/green]" if row["available"] else f"[red]no[/red] ({row['reason']})"
        table.add_row(row["name"], status, row["description"])
    Console().print(table)
