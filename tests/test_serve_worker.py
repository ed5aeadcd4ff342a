"""The model process behind `toolbox serve` (toolbox.serving.worker), driven directly.

One real child process (`python -m toolbox.serving.worker`) with the embedded model;
its results are compared with the same model loaded in this process.
"""

from __future__ import annotations

import os
import signal

import pytest

from toolbox.api import load
from toolbox.backend import GenerationParams, LoadOptions
from toolbox.errors import ToolboxError
from toolbox.serving.worker import WorkerError, WorkerModel
from toolbox.types import SequenceRequest

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def worker():
    w = WorkerModel("embedded", None, "cpu", LoadOptions(threads=1))
    yield w
    w.close()


@pytest.fixture(scope="module")
def local():
    return load("embedded", "cpu", threads=1).loaded


def run(batcher, requests, limit=200):
    """Add `requests`, step until nothing is pending; {id: [token ids]} and the refusals."""
    for r in requests:
        batcher.add(r)
    tokens, refused = {}, []
    for _ in range(limit):
        if not batcher.pending():
            break
        for e in batcher.step():
            tokens.setdefault(e.seq, []).append(e.token_id)
        refused += batcher.take_refused()
    return tokens, refused


def test_loads_and_describes_like_an_in_process_load(worker, local):
    assert worker.backend == "cpu"
    assert worker.context_length == local.context_length
    assert worker.tokenizer.encode("吾輩は猫である。") == local.tokenizer.encode("吾輩は猫である。")
    assert worker.describe()["parameters"] == local.describe()["parameters"]


def test_batched_greedy_tokens_equal_an_in_process_batcher(worker, local):
    prompts = [local.tokenizer.encode(t) for t in ("吾輩は猫である。", "名前はまだ無い。", "どこで生れたか")]
    requests = [SequenceRequest(i + 1, p, GREEDY) for i, p in enumerate(prompts)]
    remote, refused = run(worker.batcher(4), requests)
    here = {}
    batcher = local.batcher(4)
    for r in requests:
        batcher.add(r)
    while batcher.pending():
        for e in batcher.step():
            here.setdefault(e.seq, []).append(e.token_id)
    assert refused == [] and remote == here and all(len(t) == 12 for t in remote.values())


def test_a_refused_request_is_reported_and_the_others_run(worker, local):
    vocab = len(local.tokenizer.token_bytes)
    good = SequenceRequest(7, local.tokenizer.encode("猫"), GREEDY)
    bad = SequenceRequest(8, [5, vocab + 3], GREEDY)
    tokens, refused = run(worker.batcher(4), [bad, good])
    assert list(tokens) == [7] and len(tokens[7]) == 12
    [(request_id, exc)] = refused
    assert request_id == 8 and isinstance(exc, ValueError) and f"token id {vocab + 3}" in str(exc)


def test_cancel_travels_with_the_next_step(worker, local):
    batcher = worker.batcher(4)
    long = GenerationParams(max_new_tokens=100, min_new_tokens=100, temperature=0.0)
    batcher.add(SequenceRequest(1, local.tokenizer.encode("猫"), long))
    batcher.add(SequenceRequest(2, local.tokenizer.encode("犬"), long))
    batcher.step()  # admitted
    batcher.cancel(1)
    seen = {e.seq for e in batcher.step()}
    assert seen == {2} and batcher.pending() == 1 and batcher.running() == 1
    batcher.cancel(2)
    assert batcher.step() == [] and batcher.pending() == 0


def test_scores_equal_and_errors_come_back_as_one_line_errors(worker, local):
    ids = local.tokenizer.encode("吾輩は猫である。名前はまだ無い。")
    assert worker.score([ids]) == local.score([ids])
    assert worker.score_from([ids], [3]) == local.score_from([ids], [3])
    with pytest.raises(ToolboxError, match="context"):
        worker.score([[5] * (local.context_length + 1)])
    with pytest.raises(ToolboxError, match="first scored token 0"):
        worker.score_from([ids], [0])


def test_a_load_failure_is_a_one_line_error():
    with pytest.raises(ToolboxError, match="no-such-model"):
        WorkerModel("./no-such-model", None, "cpu", LoadOptions(threads=1))


def test_a_dead_process_is_a_worker_error_with_its_signal():
    w = WorkerModel("embedded", None, "cpu", LoadOptions(threads=1))
    try:
        os.kill(w.pid, signal.SIGKILL)
        with pytest.raises(WorkerError, match="killed by signal 9"):
            w.score([[5, 6]])
        assert w.failure is not None
    finally:
        w.close()
