"""Docs that are generated from the code stay in sync with it."""

from pathlib import Path

from toolbox import clidoc

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_matches_help():
    on_disk = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert on_disk == clidoc.render(), "docs/cli.md is stale: run `python -m toolbox.clidoc > docs/cli.md`"
