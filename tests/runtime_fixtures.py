"""Shared helpers for tests/test_runtime_*.py: tiny random GPT-NeoX checkpoints.

Kept out of conftest.py on purpose; import with ``from runtime_fixtures import ...``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=256,
    bos_token_id=2,
    eos_token_id=3,
    tie_word_embeddings=False,
)
EOS = 3
TINY_CONTEXT = 96  # context of the `tiny_checkpoint` fixture (conftest.py)


def build_hf(rotary_pct=1.0, parallel=True, seed=0, init=0.1, **overrides):
    """A random transformers GPTNeoXForCausalLM (fp32, eval) in a scaled-down series shape.

    Weights use a larger init than HF's default and random LayerNorm/bias values, so
    logits are peaked (greedy has clear winners) and every parameter matters.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        **{**SMALL, **overrides},
        rotary_pct=rotary_pct,
        use_parallel_residual=parallel,
        initializer_range=init,
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save(model, path: Path, fmt: str = "safetensors") -> Path:
    """Save ``model`` as ``safetensors`` (one file), ``sharded`` safetensors, ``bin``
    (one pytorch_model.bin, with the legacy attention buffers included), or
    ``rinna_config`` (safetensors plus a config.json in the original rinna style:
    top-level rotary_pct / rotary_emb_base, no rope_parameters)."""
    path = Path(path)
    if fmt == "sharded":
        model.save_pretrained(path, max_shard_size="100KB")
        assert (path / "model.safetensors.index.json").exists()
        return path
    model.save_pretrained(path)
    if fmt == "bin":
        from safetensors.torch import load_file

        sd = load_file(path / "model.safetensors")
        n = model.config.max_position_embeddings
        sd["gpt_neox.layers.0.attention.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        sd["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
        sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
        torch.save(sd, path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    elif fmt == "rinna_config":
        cfg = json.loads((path / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rotary_pct"] = rope["partial_rotary_factor"]
        cfg["rotary_emb_base"] = rope["rope_theta"]
        (path / "config.json").write_text(json.dumps(cfg))
    else:
        assert fmt == "safetensors", fmt
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()
