"""A small random checkpoint in the Hugging Face layout with the embedded tokenizer.

Used by the command tests (generate, chat, batch); import with
`from model_fixtures import tiny_checkpoint`.
"""

from __future__ import annotations

import shutil

import pytest
from runtime_fixtures import build_hf, save

from toolbox.registry import EMBEDDED_DIR

CONTEXT = 96


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """config.json + model.safetensors + spiece.model; context of CONTEXT tokens."""
    path = tmp_path_factory.mktemp("tiny")
    save(build_hf(vocab_size=8000, max_position_embeddings=CONTEXT, init=0.05), path)
    shutil.copy(EMBEDDED_DIR / "spiece.model", path / "spiece.model")
    return path
