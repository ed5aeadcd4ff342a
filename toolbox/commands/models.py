"""`toolbox models list|show` and `toolbox download`."""

from __future__ import annotations

import json

import click

from toolbox.checkpoints import download as fetch
from toolbox.checkpoints import lookup, parse_model, registry
from toolbox.commands.options import revision_option
from toolbox.errors import ToolboxError


@click.group()
def models():
    """The model registry: the series' four variants and the embedded model."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of entries.")
def list_models(as_json):
    """List registry entries with their aliases."""
    specs = list(registry())
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in specs], ensure_ascii=False, indent=2))
        return
    from rich.console import Console
    from rich.table import Column, Table

    table = Table("aliases", Column("id", no_wrap=True), "role", box=None, padding=(0, 2, 0, 0))
    for s in specs:
        table.add_row(", ".join(s.aliases), s.id, s.role)
    Console().print(table)


@models.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="The entry as JSON.")
def show_model(name, as_json):
    """Show one entry: architecture, prompt format, generation defaults."""
    spec = lookup(name)
    if spec is None:
        raise ToolboxError(f"{name!r} is not in the registry; see `toolbox models list`")
    data = spec.to_dict()
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("field", "value", title=spec.id, show_header=False)
    for key in ("aliases", "role", "description", "prompt_format", "license", "path", "notes"):
        if data[key]:
            table.add_row(key, ", ".join(data[key]) if isinstance(data[key], list) else str(data[key]))
    for group in ("architecture", "defaults"):
        for key, value in data[group].items():
            if value != "":
                table.add_row(f"{group}.{key}", str(value))
    Console().print(table)


@click.command()
@click.argument("name")
@revision_option
def download(name, revision):
    """Fetch a hub model into the Hugging Face cache ahead of time (with progress bars).

    Honours HF_HOME / HF_HUB_CACHE; later commands then work with HF_HUB_OFFLINE=1.
    """
    if not name.strip():
        raise click.BadParameter("a registry name or hub id (owner/name) is needed", param_hint="NAME")
    ref = parse_model(name, revision)
    if ref.repo_id is None:
        click.echo(f"{name} is local ({ref.local_dir}); nothing to download")
        return
    click.echo(fetch(ref, fetching=True))
