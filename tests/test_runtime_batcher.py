"""The continuous batcher: requests join and leave a running batch, each with its own settings."""

from dataclasses import replace

import pytest
import torch
from runtime_fixtures import EOS
from torch import Tensor

from toolbox.backend import GenerationParams
from toolbox.runtime.batcher import ContinuousBatcher
from toolbox.runtime.generation import Generation
from toolbox.runtime.sampling import SamplingParams
from toolbox.types import SequenceRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(neox3):
    return neox3


def _prompt(length, seed):
    return torch.randint(4, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(model, prompt, params: GenerationParams, eos=()):
    """(tokens, logprobs, finish_reason) of a static `generate` of this prompt alone."""
    sampling = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                              repetition_penalty=params.repetition_penalty, seed=params.seed)
    toks, lps, reason = [], [], None
    for step in Generation(model, [prompt], max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
                         sampling=sampling, eos_token_ids=eos):
        (t,) = step.tokens
        toks.append(t.token_id)
        lps.append(t.logprob)
        reason = t.finish_reason
    return toks, lps, reason


def _drive(batcher, arrivals=None, on_step=None, limit=500):
    """Step until nothing is pending; ``arrivals`` {step: [requests]} are added before that step."""
    arrivals = dict(arrivals or {})
    out, step = {}, 0
    while batcher.pending() or arrivals:
        for r in arrivals.pop(step, []):
            batcher.add(r)
        for e in batcher.step():
            toks, lps, reason = out.setdefault(e.seq, ([], [], None))
            assert reason is None, f"event for {e.seq} after it finished"
            toks.append(e.token_id)
            lps.append(e.logprob)
            out[e.seq] = (toks, lps, e.finish_reason)
        if on_step:
            on_step(step, batcher)
        step += 1
        assert step < limit
    return out


@pytest.mark.parametrize("prefill_tokens", [4096, 12])  # ragged prefills grouped, or one at a time
def test_staggered_greedy_equals_each_alone(model, prefill_tokens):
    specs = [(5, 20), (12, 7), (1, 15), (9, 30), (3, 1), (20, 12), (7, 25)]  # (prompt length, max_new_tokens)
    reqs = [SequenceRequest(i, _prompt(n, i), GenerationParams(temperature=0, max_new_tokens=m))
            for i, (n, m) in enumerate(specs)]
    arrivals = {0: reqs[:2], 2: reqs[2:4], 3: [reqs[4]], 9: reqs[5:]}  # more than the 4 rows at times
    batcher = ContinuousBatcher(model, [], capacity=4)
    batcher.PREFILL_TOKENS = prefill_tokens
    counts = []
    got = _drive(batcher, arrivals, on_step=lambda s, b: counts.append((b.running(), b.pending())))
    assert max(r for r, _ in counts) == 4 and max(p for _, p in counts) > 4  # the cap held, others waited
    for r in reqs:
        toks, lps, reason = _alone(model, r.prompt, r.params)
        assert got[r.id][0] == toks and got[r.id][2] == reason == "length"
        assert got[r.id][1] == pytest.approx(lps, abs=1e-4)
    assert len(set(got[3][0])) > 5  # the random model does not just repeat a token


def test_mixed_settings_and_seeded_reproducibility(model):
    seeded = GenerationParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=11, max_new_tokens=24)
    mixed = [
        SequenceRequest(0, _prompt(6, 1), GenerationParams(temperature=0, repetition_penalty=1.2, max_new_tokens=24)),
        SequenceRequest(1, _prompt(9, 2), seeded),
        SequenceRequest(2, _prompt(4, 3), GenerationParams(temperature=1.2, top_p=0.5, max_new_tokens=20)),
        SequenceRequest(3, _prompt(8, 4), GenerationParams(temperature=1.0, top_k=3, seed=5, max_new_tokens=16)),
    ]
    got = _drive(ContinuousBatcher(model, [], capacity=4), {0: mixed[:1], 1: mixed[1:]})
    for r in (mixed[0], mixed[1], mixed[3]):  # greedy and seeded requests equal a static run alone
        toks, lps, _ = _alone(model, r.prompt, r.params)
        assert got[r.id][0] == toks
        assert got[r.id][1] == pytest.approx(lps, abs=1e-4)
    assert len(got[2][0]) == 20
    # the seeded request again, with other companions arriving at other times
    other = _drive(ContinuousBatcher(model, [], capacity=3),
                   {0: [SequenceRequest(7, _prompt(30, 9), GenerationParams(temperature=1.0, max_new_tokens=40))],
                    3: [SequenceRequest(1, mixed[1].prompt, seeded)]})
    assert other[1][0] == got[1][0]
    reseeded = _drive(ContinuousBatcher(model, [], capacity=1),
                      {0: [SequenceRequest(1, mixed[1].prompt, replace(seeded, seed=12))]})
    assert reseeded[1][0] != got[1][0]


def test_cancel_frees_a_row_for_a_waiting_request(model):
    reqs = [SequenceRequest(i, _prompt(4 + i, 20 + i), GenerationParams(temperature=0, max_new_tokens=12))
            for i in range(4)]
    b = ContinuousBatcher(model, [], capacity=2)
    for r in reqs:
        b.add(r)
    b.cancel(3)  # a waiting request
    assert (b.running(), b.pending()) == (0, 3)
    first = b.step()
    assert sorted(e.seq for e in first) == [0, 1] and (b.running(), b.pending()) == (2, 3)
    b.step()
    b.cancel(0)  # a running request: its row is free at once
    assert (b.running(), b.pending()) == (1, 2)
    b.cancel(99)  # unknown: ignored
    events = b.step()  # an admit step: the newcomer's first token goes out on its own
    assert [e.seq for e in events] == [2] and b.running() == 2
    events += b.step()  # then a decode step advances every row, the newcomer included
    assert sorted(e.seq for e in events) == [1, 2, 2]
    got = _drive(b)
    assert 0 not in got and 3 not in got
    toks, _, _ = _alone(model, reqs[2].prompt, reqs[2].params)
    assert [e.token_id for e in events if e.seq == 2] + got[2][0] == toks
    toks, _, _ = _alone(model, reqs[1].prompt, reqs[1].params)
    assert got[1][0] == toks[3:]
    assert (b.running(), b.pending()) == (0, 0) and b.step() == []


def test_eos_min_and_max_new_tokens(model):
    prompt = _prompt(5, 6)
    free, _, _ = _alone(model, prompt, GenerationParams(temperature=0, max_new_tokens=30))
    eos = free[4]  # pretend the token greedy emits at step 4 is EOS
    first = free.index(eos)
    reqs = [
        SequenceRequest(0, prompt, GenerationParams(temperature=0, max_new_tokens=30)),
        SequenceRequest(1, prompt, GenerationParams(temperature=0, max_new_tokens=30, min_new_tokens=first + 3)),
        SequenceRequest(2, prompt, GenerationParams(temperature=0, max_new_tokens=1)),  # ends at its prefill
        SequenceRequest(3, prompt, GenerationParams(temperature=0.7, seed=1, max_new_tokens=30, min_new_tokens=30)),
    ]
    got = _drive(ContinuousBatcher(model, [eos, EOS], capacity=4), {0: reqs[:2], 1: reqs[2:]})
    assert got[0][0] == free[: first + 1] and got[0][2] == "stop"
    held = _alone(model, prompt, reqs[1].params, eos=[eos, EOS])
    assert got[1][0] == held[0] and got[1][2] == held[2]
    assert eos not in got[1][0][: first + 3] and len(got[1][0]) >= first + 3
    assert got[2][0] == free[:1] and got[2][2] == "length"
    assert len(got[3][0]) == 30 and eos not in got[3][0] and EOS not in got[3][0] and got[3][2] == "length"


def test_add_rejects_what_cannot_run(model):
    b = ContinuousBatcher(model, [EOS], capacity=2)
    too_long = r"^prompt of 200 tokens \+ max_new_tokens 57 exceeds the batcher's 256 cache slots$"
    with pytest.raises(ValueError, match=too_long):
        b.add(SequenceRequest(0, [5] * 200, GenerationParams(max_new_tokens=57)))
    b.add(SequenceRequest(0, [5] * 200, GenerationParams(max_new_tokens=56)))
    with pytest.raises(ValueError, match="already queued"):
        b.add(SequenceRequest(0, [5], GenerationParams()))
    with pytest.raises(ValueError, match="at least one token"):
        b.add(SequenceRequest(1, [], GenerationParams()))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        b.add(SequenceRequest(1, [512], GenerationParams()))
    with pytest.raises(ValueError, match="top_p"):
        b.add(SequenceRequest(1, [5], GenerationParams(top_p=0.0)))
    assert b.pending() == 1
    small = ContinuousBatcher(model, [EOS], capacity=2, max_seq_len=64)
    with pytest.raises(ValueError, match="exceeds the batcher's 64 cache slots"):
        small.add(SequenceRequest(0, [5] * 60, GenerationParams(max_new_tokens=5)))
    with pytest.raises(ValueError, match="outside 1..256"):
        ContinuousBatcher(model, [EOS], capacity=2, max_seq_len=300)


def test_cache_grows_and_reserve(model):
    b = ContinuousBatcher(model, [], capacity=8)
    reqs = [SequenceRequest(i, _prompt(3 + 10 * i, 40 + i), GenerationParams(temperature=0, max_new_tokens=6 + 9 * i))
            for i in range(6)]
    got = _drive(b, {2 * i: [r] for i, r in enumerate(reqs)})  # every arrival needs more rows and slots
    assert b._alloc[0] >= 6 and b._alloc[1] >= 3 + 50 + 6 + 45
    for r in reqs:
        assert got[r.id][0] == _alone(model, r.prompt, r.params)[0]
    full = ContinuousBatcher(model, [], capacity=3)
    full.reserve()
    assert full._alloc == (3, model.cache_slots(256))  # on the CPU one block of 64 slots past the context


def test_per_row_cache_positions(model):
    """forward with cache_pos [B,T] and a caller-owned cache: each row at its own slots."""
    ids = torch.randint(4, 512, (2, 10), generator=torch.Generator().manual_seed(5))
    full = model.forward_full(ids)
    cache = model.new_cache(2, 16)
    model(ids[:1, :6], torch.arange(6)[None], torch.arange(6), None, cache=[(k[:1], v[:1]) for k, v in cache])
    model(ids[1:, :3], torch.arange(3)[None], torch.arange(3), None, cache=[(k[1:], v[1:]) for k, v in cache])
    # row 0 at slots 6..8, row 1 at slots 3..5, in one forward
    pos = torch.tensor([[6, 7, 8], [3, 4, 5]])
    out = model(ids.gather(1, pos), pos, pos, None, cache=cache)
    torch.testing.assert_close(out[0], full[0, 6:9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], full[1, 3:6], rtol=1e-4, atol=1e-4)


def test_rows_with_non_finite_logits_sample_as_sample_does(model):
    """Decode logits mixing NaN, +inf and -inf (broken weights, an overflow) make the batch take
    `finite_scores`' repairs; each row must still pick what `sample` picks for it alone with the same
    seed, bans and cut vocabulary, and a row with nothing finite must fail on its own."""
    from toolbox.runtime.sampling import sample

    V, inf, nan = model.config.vocab_size, float("inf"), float("nan")

    def crafted(length: int) -> Tensor:  # a row's logits at a position (prompts of distinct lengths)
        g = torch.Generator().manual_seed(length)
        x = torch.randn(V, generator=g) * 4
        kind = length % 6
        if kind == 1:
            x[torch.randint(V, (40,), generator=g)] = nan
        elif kind == 2:
            x[[7, 300, 301]] = inf
        elif kind == 3:
            x[torch.rand(V, generator=g) < 0.9] = -inf
        elif kind == 4 and length > 12:
            x[:] = nan  # nothing finite: this row fails, the others go on
        return x

    def decode_fn(ids, pos, cache_pos, key_mask, kv_len, cache):
        return torch.stack([crafted(int(p)) for p in pos[:, 0]])[:, None]

    eos, sampled_vocab = [3, 300], 500
    specs = [(0.7, 11, 20), (1.3, 12, 0), (0, None, 20), (0.9, 13, 5), (2.0, 14, 0), (0.5, 15, 25)]
    reqs = [SequenceRequest(i, _prompt(i + 2, 50 + i), GenerationParams(
        temperature=t, seed=seed, max_new_tokens=30, min_new_tokens=m)) for i, (t, seed, m) in enumerate(specs)]
    b = ContinuousBatcher(model, eos, capacity=6, sampled_vocab=sampled_vocab, decode_fn=decode_fn)
    got = _drive(b, {0: reqs})
    failed = dict(b.take_refused())
    outside = torch.arange(V) >= sampled_vocab
    for r in reqs:
        params = SamplingParams(temperature=r.params.temperature, seed=r.params.seed)
        gen = torch.Generator().manual_seed(r.params.seed) if r.params.seed is not None else None
        if gen is not None:
            torch.rand(1, generator=gen)  # the prefill's draw
        toks = got[r.id][0]
        for n, token in enumerate(toks[1:], start=1):
            want, _ = sample(crafted(len(r.prompt) + n - 1)[None], params, gen, outside=outside,
                             banned=torch.tensor(eos) if n < r.params.min_new_tokens else None)
            assert token == want.item(), (r.id, n)
        length = len(r.prompt) + len(toks) - 1  # the position its next step read
        if r.id in failed:
            assert length % 6 == 4 and length > 12 and "no finite logits" in str(failed[r.id])
        else:  # an EOS (300 is one of the +inf ids) ends a row once its min_new_tokens allow
            assert (toks[-1] in eos, len(toks) == 30) in ((True, False), (False, True))
            assert got[r.id][2] == ("stop" if toks[-1] in eos else "length")
            assert not set(eos) & set(toks[1:r.params.min_new_tokens])
    assert failed and len(failed) < len(reqs)
