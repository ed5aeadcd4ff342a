"""The tokenizer commands and --help start fast: they never import torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, _clean_env

HEAVY = ("torch", "transformers")

# Runs the CLI in a fresh interpreter, then reports which heavy modules got imported.
PROBE = """
import json, runpy, sys
args, watched = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["toolbox", *args]
status = 0
try:
    runpy.run_module("toolbox", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    status = exc.code or 0
loaded = [name for name in watched if name in sys.modules]
sys.stderr.write("\\nPROBE " + json.dumps({"status": status, "loaded": loaded}) + "\\n")
"""


def imported_heavy(args: list[str], stdin: bytes = b"") -> dict:
    p = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)],
        input=stdin, capture_output=True, env=_clean_env(), cwd=REPO, timeout=60,
    )
    marker = [line for line in p.stderr.decode().splitlines() if line.startswith("PROBE ")]
    assert marker, p.stderr.decode()
    return json.loads(marker[-1][len("PROBE ") :])


@pytest.mark.parametrize(
    "args, stdin",
    [
        (["--help"], b""),
        (["tokenize", "--format", "json"], "吾輩は猫🍣\n".encode()),
        (["tokenize", "吾輩は猫"], b""),
        (["detokenize", "--from", "pieces"], "吾 輩\n".encode()),
        (["inspect-bytes", "寿司🍣"], b""),
        (["inspect-bytes", "--summary"], "寿司🍣\n".encode()),
        (["models", "list"], b""),
        (["models", "show", "sft"], b""),
        (["eval", "--help"], b""),
        (["finetune", "--help"], b""),
        (["classify", "--help"], b""),
        (["serve", "--help"], b""),
    ],
)
def test_no_heavy_imports(args, stdin):
    result = imported_heavy(args, stdin)
    assert result["status"] == 0
    assert result["loaded"] == [], f"`toolbox {' '.join(args)}` imported {result['loaded']}"


def test_probe_detects_imports():
    """The probe itself works: a command that needs transformers is seen importing it."""
    pytest.importorskip("transformers")
    result = imported_heavy(["inspect-bytes", "--compare-hf", "--json", "猫"])
    assert result["status"] == 0
    assert "transformers" in result["loaded"]
