"""Parity of our runtime with transformers on the embedded model (fp16 weights, fp32 compute)."""

from pathlib import Path

import pytest
import torch
from runtime_fixtures import rel_err

from toolbox.runtime.generation import Generation, score
from toolbox.runtime.model import GPTNeoX
from toolbox.runtime.sampling import SamplingParams

EMBEDDED = Path(__file__).resolve().parent.parent / "toolbox" / "data" / "embedded"

pytestmark = pytest.mark.skipif(
    not (EMBEDDED / "model.safetensors").is_file(), reason="embedded model weights not built"
)


@pytest.fixture(scope="module")
def pair():
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(EMBEDDED, dtype=torch.float32).eval()
    return hf, GPTNeoX.from_pretrained(EMBEDDED, dtype=torch.float32)


def test_embedded_logits_match_transformers(pair):
    hf, ours = pair
    vocab = ours.config.vocab_size
    ids = torch.randint(4, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(ours.forward_full(ids), ref) < 1e-4


def test_embedded_greedy_and_score_match_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(4, ours.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    eos = ours.config.eos_token_ids or (3,)
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                      eos_token_id=list(eos), pad_token_id=0)[0, 12:].tolist()
    got = [t.token_id for step in Generation(ours, [prompt], max_new_tokens=32, min_new_tokens=32,
                                           eos_token_ids=eos, sampling=SamplingParams(temperature=0))
           for t in step.tokens]
    assert got == ref
    seq = prompt + ref
    with torch.no_grad():
        logits = hf(torch.tensor([seq])).logits[0, :-1]
    want = logits.log_softmax(-1).gather(1, torch.tensor(seq[1:])[:, None]).sum().item()
    assert abs(score(ours, [seq])[0].logprobs.sum().item() - want) <= 1e-5 * abs(want)
