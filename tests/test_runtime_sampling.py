"""Sampling filters against transformers' logits processors, and sampler behaviour."""

import pytest
import torch

from toolbox.runtime.sampling import SamplingParams, draw, process_logits, sample


def _logits(seed=0, B=4, V=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3


def _hf_chain(params, input_ids):
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = []
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature not in (0, 1.0):
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList(procs)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(top_k=5),
        SamplingParams(top_k=1000),
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.3),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.8),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1),
        SamplingParams(temperature=1.5, top_k=3, top_p=0.5, repetition_penalty=1.2),
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_filters_match_transformers(params, seed):
    logits = _logits(seed)
    input_ids = torch.randint(0, logits.shape[1], (logits.shape[0], 30), generator=torch.Generator().manual_seed(seed))
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, input_ids, True)
    ours = process_logits(logits, params, seen)
    ref = _hf_chain(params, input_ids)(input_ids, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


def test_greedy_and_logprobs():
    logits = _logits(1)
    tokens, lp = sample(logits, SamplingParams(temperature=0))
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(lp, logits.log_softmax(-1).max(-1).values)
    # reported logprobs stay those of the raw logits even when filters change the choice
    tokens, lp = sample(logits, SamplingParams(temperature=0.5, top_k=3), torch.Generator().manual_seed(0))
    torch.testing.assert_close(lp, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))


def test_banned_tokens_never_chosen():
    logits = torch.zeros(3, 10)
    logits[:, 4] = 50.0
    banned = torch.tensor([4])
    assert (sample(logits, SamplingParams(temperature=0), banned=banned)[0] != 4).all()
    tokens, _ = sample(logits[:1].expand(2000, 10), SamplingParams(), torch.Generator().manual_seed(0), banned=banned)
    assert (tokens != 4).all()


def test_seeded_sampling_reproducible_and_filtered():
    logits = _logits(2, B=64)
    params = SamplingParams(temperature=1.0, top_k=10)
    draw = lambda s: sample(logits, params, torch.Generator().manual_seed(s))[0]
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    allowed = torch.topk(logits, 10).indices
    assert (allowed == draw(9)[:, None]).any(-1).all()


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    tokens, _ = sample(logits, SamplingParams(), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_draw_inverts_the_cdf_and_never_picks_a_zero():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    # each uniform lands in the interval its token owns; the ends pick the first and last nonzero
    for u, want in [(0.0, 1), (0.2499, 1), (0.25, 3), (0.9, 3), (below_one, 3)]:
        assert draw(probs, torch.tensor([[u]])).item() == want, u
    # rows that do not sum to one (rounding) are scaled, not overrun, and still skip zeros
    probs = torch.tensor([[0.3, 0.3, 0.0], [0.0, 1e-30, 0.0]])
    assert draw(probs, torch.full((2, 1), below_one)).tolist() == [1, 1]


def test_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


def test_rows_with_non_finite_logits_still_give_real_tokens():
    """NaN and inf in any row (broken weights, an overflow) never make a NaN distribution or an id past
    the vocabulary; the other rows sample as usual."""
    V = 50
    logits = torch.randn(5, V)
    logits[0] = float("nan")  # nothing usable: some real id
    logits[1, 7] = float("inf")  # one +inf: that id
    logits[2, [3, 9]] = float("inf")  # two: one of them
    logits[3, :] = float("-inf")  # everything excluded: some real id
    gen = torch.Generator().manual_seed(0)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1e-30), SamplingParams(top_p=1e-30),
                   SamplingParams(temperature=1.0, repetition_penalty=1e-30)):
        seen = torch.ones(5, V, dtype=torch.bool)
        tokens, logprobs = sample(logits.clone(), params, gen, seen)
        assert tokens.shape == (5,) and bool(((tokens >= 0) & (tokens < V)).all())
        assert tokens[1].item() == 7 and tokens[2].item() in (3, 9)
        clean = sample(logits[4:].clone(), params, torch.Generator().manual_seed(1), seen[4:])[0]
        assert 0 <= clean.item() < V


def test_ids_outside_the_tokenizer_are_never_sampled():
    logits = torch.zeros(3, 40)
    logits[:, 35:] = 50.0  # the padded tail is by far the most likely
    outside = torch.arange(40) >= 32
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)):
        tokens, _ = sample(logits, params, torch.Generator().manual_seed(0), outside=outside)
        assert bool((tokens < 32).all())


def test_finite_scores_and_any_finite_follow_their_definitions_row_by_row():
    """Against the definitions worked row by row in plain Python: NaN excluded; +inf entries win
    as equals; a row with nothing left is uniform; otherwise the softmax of the finite scores."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from toolbox.runtime.sampling import any_finite, finite_scores

    special = st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 1e-45])
    value = st.one_of(st.floats(-50, 50), special)

    def expected(row: list[float]) -> list[float]:
        if any(x == float("inf") for x in row):
            keep = [x == float("inf") for x in row]
        elif all(x != x or x == float("-inf") for x in row):
            keep = [True] * len(row)
        else:
            finite = torch.tensor([x if x == x else float("-inf") for x in row], dtype=torch.float64)
            return finite.softmax(-1).tolist()
        return [k / sum(keep) for k in keep]

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.lists(value, min_size=6, max_size=6), min_size=1, max_size=4))
    def check(rows):
        scores = torch.tensor(rows, dtype=torch.float32)
        probs = finite_scores(scores).double().softmax(-1)
        assert not probs.isnan().any()
        assert torch.allclose(probs, torch.tensor([expected(r) for r in rows], dtype=torch.float64), atol=1e-6)
        assert any_finite(scores).tolist() == [any(abs(x) < float("inf") for x in r) for r in rows]

    check()


def test_greedy_picks_the_argmax_of_the_finite_scores():
    """Greedy skips `finite_scores`' shift; it must pick what the shifted scores' argmax picks, for
    rows mixing NaN, +inf and -inf, rows of only NaN or only -inf, and rows of negative scores."""
    from toolbox.runtime.sampling import finite_scores

    gen = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0.0)
    for t in range(300):
        x = torch.randn(4, 50, generator=gen) * 10.0 ** torch.randint(-40, 37, (1,), generator=gen).item()
        u = torch.rand(4, 50, generator=gen)
        x[u < 0.05], x[(u > 0.05) & (u < 0.08)], x[(u > 0.08) & (u < 0.2)] = float("nan"), float("inf"), float("-inf")
        x[0] = float("-inf") if t % 3 == 0 else x[0]
        x[1] = float("nan") if t % 5 == 0 else x[1]
        x[2] = -x[2].abs()  # every finite score negative: a NaN read as 0 would win
        assert torch.equal(sample(x.clone(), greedy)[0], finite_scores(x).argmax(-1)), x


def test_the_steps_greedy_pick_equals_sample_with_banned_and_outside_ids():
    """`pick_greedy` (run inside a compiled decode step) with its additive ``forbid`` row chooses
    what `sample` chooses with the same banned ids and outside mask, and reports the same
    logprob, on rows mixing NaN, +inf and -inf, including +inf at a banned id."""
    from toolbox.runtime.sampling import forbidden, pick_greedy

    gen = torch.Generator().manual_seed(1)
    greedy = SamplingParams(temperature=0.0)
    V = 60
    for t in range(200):
        x = torch.randn(3, V, generator=gen) * 10.0 ** torch.randint(-40, 37, (1,), generator=gen).item()
        u = torch.rand(3, V, generator=gen)
        x[u < 0.05], x[(u > 0.05) & (u < 0.08)], x[(u > 0.08) & (u < 0.2)] = float("nan"), float("inf"), float("-inf")
        banned = torch.randint(0, V, (2,), generator=gen)
        x[0, banned[0]] = float("inf")  # the row's best is banned
        outside = torch.arange(V) >= V - (t % 7)
        for ban, out in ((banned, outside), (None, outside), (banned, None), (None, None)):
            want_tok, want_lp = sample(x.clone(), greedy, banned=ban, outside=out)
            tok, lp = pick_greedy(x.clone(), forbidden(V, ban, out))
            assert torch.equal(tok, want_tok), (x, ban, out)
            torch.testing.assert_close(lp, want_lp, equal_nan=True)
