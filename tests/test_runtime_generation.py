"""The generation loop and scoring, against transformers where it has an equivalent."""

import pytest
import torch
from runtime_fixtures import EOS, build_hf, save

from toolbox.runtime.generation import Generation, score
from toolbox.runtime.model import GPTNeoX
from toolbox.runtime.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module", params=[(1.0, True), (0.25, False)], ids=["rot1-parallel", "rot.25-sequential"])
def models(request, tmp_path_factory):
    rotary_pct, parallel = request.param
    hf = build_hf(rotary_pct=rotary_pct, parallel=parallel, num_hidden_layers=3)
    return hf, GPTNeoX.from_pretrained(save(hf, tmp_path_factory.mktemp("ckpt")))


def _prompt(length, seed):
    return torch.randint(4, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(gen):
    """Collect {seq: (tokens, logprobs, finish_reason)} from a Generation."""
    out = {}
    for step in gen:
        for t in step.tokens:
            toks, lps, _ = out.setdefault(t.seq, ([], [], None))
            toks.append(t.token_id)
            lps.append(t.logprob)
            out[t.seq] = (toks, lps, t.finish_reason)
    return out


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_transformers_generate(models, penalty):
    hf, ours = models
    prompt = list(range(100, 110))  # a prompt on which both random models stay varied
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64, min_new_tokens=64,
                      eos_token_id=EOS, pad_token_id=0, repetition_penalty=penalty)[0, 10:].tolist()
    got = _run(Generation(ours, [prompt], max_new_tokens=64, min_new_tokens=64, eos_token_ids=[EOS],
                        sampling=SamplingParams(temperature=0, repetition_penalty=penalty)))
    tokens, logprobs, reason = got[0]
    assert tokens == ref and reason == "length" and EOS not in tokens
    assert len(set(tokens)) > 5  # the random model does not just repeat a token
    assert all(lp <= 0 for lp in logprobs)


def test_logprobs_match_transformers_scores(models):
    hf, ours = models
    prompt = _prompt(6, 1)
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                      eos_token_id=EOS, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref_lp = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(ref.logits, ref.sequences[0, 6:])]
    _, lps, _ = _run(Generation(ours, [prompt], max_new_tokens=8, sampling=GREEDY))[0]
    assert lps == pytest.approx(ref_lp, abs=1e-4)


def test_ragged_batch_equals_each_prompt_alone(models):
    _, ours = models
    prompts = [_prompt(3, 2), _prompt(11, 3), _prompt(7, 4), _prompt(1, 5)]
    alone = [_run(Generation(ours, [p], max_new_tokens=20, sampling=GREEDY))[0][0] for p in prompts]
    batched = _run(Generation(ours, prompts, max_new_tokens=20, sampling=GREEDY))
    assert [batched[i][0] for i in range(4)] == alone
    # the same through a full-cache decode step (what a CUDA-graph backend runs)
    full = _run(Generation(ours, prompts, max_new_tokens=20, sampling=GREEDY,
                         decode_fn=lambda ids, pos, slot, mask, kv_len: ours(ids, pos, slot, mask)))
    assert [full[i][0] for i in range(4)] == alone


def test_eos_stop_and_min_new_tokens(models):
    _, ours = models
    prompt = _prompt(5, 6)
    free, _, _ = _run(Generation(ours, [prompt], max_new_tokens=30, sampling=GREEDY))[0]
    k = 4
    eos = free[k]  # pretend the token greedy emits at step k is EOS
    first = free.index(eos)
    stopped, _, reason = _run(Generation(ours, [prompt], max_new_tokens=30, sampling=GREEDY, eos_token_ids=[eos]))[0]
    assert reason == "stop" and stopped == free[: first + 1]
    held, _, _ = _run(Generation(ours, [prompt], max_new_tokens=30, min_new_tokens=first + 3,
                               sampling=GREEDY, eos_token_ids=[eos]))[0]
    assert eos not in held[: first + 3] and len(held) >= first + 3


def test_length_finish_n_samples_and_seeds(models):
    _, ours = models
    prompts = [_prompt(4, 7), _prompt(9, 8)]
    params = SamplingParams(temperature=1.0, top_k=50, seed=123)
    gen = Generation(ours, prompts, max_new_tokens=12, sampling=params, n=3)
    assert gen.num_seqs == 6 and [gen.prompt_index(s) for s in range(6)] == [0, 0, 0, 1, 1, 1]
    a = _run(gen)
    assert sorted(a) == list(range(6))
    assert all(len(toks) == 12 and reason == "length" for toks, _, reason in a.values())
    assert len({tuple(a[s][0]) for s in range(3)}) > 1  # samples of one prompt differ
    b = _run(Generation(ours, prompts, max_new_tokens=12, sampling=params, n=3))
    assert {s: v[0] for s, v in a.items()} == {s: v[0] for s, v in b.items()}
    c = _run(Generation(ours, prompts, max_new_tokens=12, n=3,
                      sampling=SamplingParams(temperature=1.0, top_k=50, seed=124)))
    assert {s: v[0] for s, v in a.items()} != {s: v[0] for s, v in c.items()}


def test_cancel_stops_one_sequence(models):
    _, ours = models
    gen = Generation(ours, [_prompt(4, 9), _prompt(6, 10)], max_new_tokens=10, sampling=GREEDY)
    seen = []
    for step in gen:
        seen.append([t.seq for t in step.tokens])
        if step.index == 2:
            gen.cancel(0)
    assert seen[:3] == [[0, 1]] * 3 and seen[3:] == [[1]] * 7
    gen = Generation(ours, [_prompt(4, 9)], max_new_tokens=10, sampling=GREEDY)
    steps = []
    for step in gen:
        steps.append(step)
        gen.cancel(0)
    assert len(steps) == 1


def test_errors(models):
    _, ours = models
    with pytest.raises(ValueError, match=r"^prompt of 200 tokens \+ max_new_tokens 57 exceeds the model's context of 256$"):
        Generation(ours, [[5] * 200], max_new_tokens=57)
    Generation(ours, [[5] * 200], max_new_tokens=56)
    with pytest.raises(ValueError, match="at least one token"):
        Generation(ours, [[]], max_new_tokens=5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Generation(ours, [[512]], max_new_tokens=5)


def test_score_matches_transformers(models):
    hf, ours = models
    seqs = [_prompt(n, 20 + n) for n in (17, 5, 30, 1, 12)]
    got = score(ours, seqs, max_batch_tokens=40)  # forces several batches
    for seq, scores in zip(seqs, got):
        lp = scores.logprobs
        assert lp.shape == scores.ranks.shape == (len(seq) - 1,) and lp.dtype == torch.float32
        if len(seq) < 2:
            continue
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0, :-1].float()
        ref = logits.log_softmax(-1).gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1)
        assert abs(lp.sum().item() - ref.sum().item()) <= 1e-5 * abs(ref.sum().item())
        torch.testing.assert_close(lp, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=5)])
def test_lookahead_pipelining_gives_the_same_stream(models, sampling):
    """The CUDA path queues step t+1 before reading step t: the tokens must not change."""
    _, ours = models
    prompts = [_prompt(5, 11), _prompt(8, 12)]
    kw = dict(max_new_tokens=20, min_new_tokens=3, sampling=sampling, eos_token_ids=[EOS], n=2)
    plain = _run(Generation(ours, prompts, lookahead=False, **kw))
    ahead = _run(Generation(ours, prompts, lookahead=True, **kw))
    assert plain == ahead
