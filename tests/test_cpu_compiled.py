"""The `cpu` backend's compiled decode step (TOOLBOX_CPU_COMPILE) against transformers.

Compiling takes seconds to tens of seconds (inductor autotunes each matrix product),
so one model is compiled for the module, at batch 1.
"""

from pathlib import Path

import pytest
import torch

from toolbox.backend import GenerationParams, LoadOptions
from toolbox.backends import pick as pick_backend
from toolbox.errors import ToolboxError

EMBEDDED = Path(__file__).resolve().parent.parent / "toolbox" / "data" / "embedded"
NEW = 40


@pytest.fixture(scope="module")
def compiled():
    model = pick_backend("cpu").load(EMBEDDED, LoadOptions(threads=2, extra={"compile": True}))
    assert model.describe()["compiled"] is True
    return model


def test_compiled_greedy_tokens_and_logprobs_equal_transformers(compiled):
    from transformers import GPTNeoXForCausalLM

    prompt = compiled.tokenizer.encode("吾輩は猫である。名前はまだ無い。")
    events = [e for step in compiled.generate_tokens([prompt], GenerationParams(
        max_new_tokens=NEW, min_new_tokens=NEW, temperature=0.0)) for e in step]
    ours = [e.token_id for e in events]

    hf = GPTNeoXForCausalLM.from_pretrained(EMBEDDED, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert ours == out.sequences[0, len(prompt):].tolist()
    # logprobs are of the raw logits (transformers' min_new_tokens masks EOS only in its processed scores)
    ref = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ours)]
    assert max(abs(e.logprob - r) for e, r in zip(events, ref)) < 1e-4


def test_a_bad_compile_setting_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("TOOLBOX_CPU_COMPILE", "maybe")
    with pytest.raises(ToolboxError, match="TOOLBOX_CPU_COMPILE: expected a boolean"):
        pick_backend("cpu").load(EMBEDDED, LoadOptions(threads=1))
