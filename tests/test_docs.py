"""Docs that are generated from the code stay in sync with it."""

from pathlib import Path

from toolbox import clidoc

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_matches_help():
    on_disk = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert on_disk == clidoc.render(), "docs/cli.md is stale: run `python -m toolbox.clidoc > docs/cli.md`"


def python_blocks(doc: Path) -> list[str]:
    """The ```python blocks of a Markdown file, in order."""
    blocks, current = [], None
    for line in doc.read_text(encoding="utf-8").splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_every_python_api_example_runs(capsys):
    """docs/python-api.md's examples, run in order in one namespace, as a reader would."""
    import torch

    threads = torch.get_num_threads()
    blocks = python_blocks(ROOT / "docs" / "python-api.md")
    assert len(blocks) >= 10
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"docs/python-api.md block {i + 1}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"example {i + 1} failed: {exc!r}\n{block}") from exc
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "<toolbox.Model 'embedded' on cpu>" in out
    assert "unknown model 'no-such-model'" in out
