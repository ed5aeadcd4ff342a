"""The token-score library (`toolbox.runtime.score_kernel`): built once per machine, the
answers of an independent float64 reference and of the eager operations (NaN and
infinities included), bad input refused before the library can read wrong memory, and
used by `toolbox score` for files but not for texts given as arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toolbox.backend import LoadOptions
from toolbox.backends import registered as backends
from toolbox.cli import cli
from toolbox.runtime import score_kernel
from toolbox.runtime.generation import TokenScores, score


@pytest.fixture(scope="module")
def kernel(module_cache):
    assert score_kernel.load(build_missing=False) is None  # nothing on disk, and nothing built
    assert not (module_cache / "compiled").exists()
    assert score_kernel.load(build_missing=True).built
    again = score_kernel.load(build_missing=False)
    assert again is not None and not again.built
    return again


def eager(logits: torch.Tensor, targets: torch.Tensor):
    """The eager operations of scoring (`TokenScores`, what the library compiles), as torch runs them."""
    return TokenScores()(logits, targets)


@pytest.mark.parametrize("rows, vocab", [(1, 2), (3, 7), (50, 8000), (5, 32003)])
def test_matches_a_float64_reference(kernel, rows, vocab):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).round(decimals=1)  # ties, which share a rank
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    logprobs, ranks = kernel(logits, targets)
    x, t = logits.double().numpy(), targets.numpy()
    chosen = x[np.arange(rows), t]
    want_ranks = (x > chosen[:, None]).sum(-1) + 1
    top = x.max(-1, keepdims=True)
    want_logprobs = chosen - (top[:, 0] + np.log(np.exp(x - top).sum(-1)))
    assert ranks.dtype == torch.int32 and logprobs.dtype == torch.float32
    assert ranks.tolist() == want_ranks.tolist()
    np.testing.assert_allclose(logprobs.numpy(), want_logprobs, rtol=1e-6, atol=1e-5)


def test_special_values_as_the_eager_operations(kernel):
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(8, 100)
    logits[0, 5] = nan  # NaN elsewhere in the row
    logits[1, 7] = inf  # the target is +inf
    logits[2, 9] = inf  # +inf elsewhere
    logits[3] = -inf  # every logit -inf
    logits[4, 0] = -inf  # the target is -inf
    logits[5] = inf
    logits[6, 3] = nan  # the target is NaN
    logits[7, 10:] = -inf  # a few finite logits
    targets = torch.tensor([0, 7, 1, 2, 0, 4, 3, 12])
    logprobs, ranks = kernel(logits, targets)
    want_logprobs, want_ranks = eager(logits, targets)
    assert ranks.tolist() == want_ranks.tolist()
    assert torch.equal(logprobs.isnan(), want_logprobs.isnan())
    both = ~want_logprobs.isnan()
    torch.testing.assert_close(logprobs[both], want_logprobs[both], rtol=1e-6, atol=1e-6)


def test_bad_input_is_refused_before_the_library_runs(kernel):
    logits, targets = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    for bad_logits, bad_targets in [
        (logits.double(), targets),  # another dtype
        (torch.randn(10, 4).t(), targets),  # not contiguous
        (logits[0], targets[:1]),  # not 2-D
        (logits, targets[:3]),  # a target missing
        (logits, targets.int()),  # int32 ids
        (logits, torch.tensor([1, 2, 3, 10])),  # past the row: inside the library it would end the process
        (logits, torch.tensor([-1, 2, 3, 4])),
        (logits[:0], targets[:0]),  # no rows
    ]:
        with pytest.raises(ValueError):
            kernel(bad_logits, bad_targets)


def test_scores_of_a_model_as_eager(kernel, tiny_checkpoint):
    model = backends()["cpu"].load(tiny_checkpoint, LoadOptions(extra={"compile": False})).module
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 8000, (n,), generator=gen).tolist() for n in (40, 17, 40, 3)]
    first = [1, 5, 30, 2]
    with_kernel = score(model, seqs, first=first, kernel=kernel, max_batch_tokens=64)
    plain = score(model, seqs, first=first, max_batch_tokens=64)
    for a, b in zip(with_kernel, plain):
        assert a.ranks.tolist() == b.ranks.tolist()
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-6, atol=1e-6)


def test_toolbox_score_uses_it_for_files_not_for_texts(kernel, module_cache, tiny_checkpoint, tmp_path, monkeypatch):
    calls = []
    run = score_kernel.ScoreKernel.__call__
    monkeypatch.setattr(score_kernel.ScoreKernel, "__call__", lambda self, *a: calls.append(1) or run(self, *a))
    monkeypatch.delenv("TOOLBOX_CPU_COMPILE", raising=False)  # the default, auto
    text = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")

    def per_token(*args):
        result = CliRunner().invoke(cli, ["score", "-m", str(tiny_checkpoint), "-b", "cpu", "--json", "--per-token",
                                          *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.splitlines()[0])["per_token"]

    monkeypatch.setenv("TOOLBOX_CACHE", str(tmp_path / "fresh"))
    as_text = per_token("-t", text)  # a short run: the library is neither built nor used
    assert not (tmp_path / "fresh" / "compiled").exists() and not calls
    monkeypatch.setenv("TOOLBOX_CACHE", str(module_cache))
    from_file = per_token(str(tmp_path / "doc.txt"))
    assert calls
    used = len(calls)
    eager_file = per_token(str(tmp_path / "doc.txt"), "-o", "compile=0")
    assert len(calls) == used
    assert [t["rank"] for t in from_file] == [t["rank"] for t in eager_file] == [t["rank"] for t in as_text]
    np.testing.assert_allclose([t["logprob"] or 0.0 for t in from_file], [t["logprob"] or 0.0 for t in eager_file],
                               atol=1e-5)
