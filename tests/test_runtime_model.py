"""Config parsing, weight loading and logits parity with transformers."""

import json

import pytest
import torch
from runtime_fixtures import build_hf, rel_err, save

from toolbox.config import NeoXConfig
from toolbox.runtime.model import GPTNeoX
from toolbox.runtime.weights import find_weight_files


def _ours_logits_cached(model, ids, with_mask=True):
    """Logits through the cached path (prefill of the whole sequence)."""
    B, T = ids.shape
    model.setup_cache(B, T + 4)
    pos = torch.arange(T).expand(B, T)
    key_mask = torch.ones(B, model.cache_shape[1], dtype=torch.bool) if with_mask else None
    return model(ids, pos, torch.arange(T), key_mask)


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [1.0, 0.25])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_logits_match_transformers(tmp_path, parallel, rotary_pct, fmt):
    hf = build_hf(rotary_pct=rotary_pct, parallel=parallel)
    ours = GPTNeoX.from_pretrained(save(hf, tmp_path, fmt))
    assert ours.config.rotary_pct == rotary_pct and ours.config.use_parallel_residual is parallel
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(ours.forward_full(ids), ref) < 1e-4
    assert rel_err(_ours_logits_cached(ours, ids), ref) < 1e-4
    assert rel_err(_ours_logits_cached(ours, ids, with_mask=False), ref) < 1e-4
    assert rel_err(ours.forward_full(ids, torch.ones_like(ids)), ref) < 1e-4
    # the outputs of the last positions only (scoring's context skipped in the last layer);
    # with left padding: row 0 starts 5 tokens late
    for start in (1, 20, 36):
        assert rel_err(ours.forward_full(ids, start=start), ref[:, start:]) < 1e-4
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        padded = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    assert rel_err(ours.forward_full(ids, mask, start=20), padded[:, 20:]) < 1e-4
    with pytest.raises(ValueError, match="start 37 is outside 0..36"):
        ours.forward_full(ids, start=37)


@pytest.mark.parametrize("fmt", ["sharded", "rinna_config"])
def test_other_layouts(tmp_path, fmt):
    from transformers import GPTNeoXForCausalLM

    hf = build_hf(rotary_pct=0.25, parallel=False)
    path = save(hf, tmp_path, fmt)
    if fmt == "sharded":
        assert len(find_weight_files(path)) > 1
    else:  # transformers must read the legacy style the same way we do
        assert GPTNeoXForCausalLM.from_pretrained(path).config.rope_parameters["partial_rotary_factor"] == 0.25
    ours = GPTNeoX.from_pretrained(path)
    assert ours.config.rotary_pct == 0.25
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(ours.forward_full(ids), hf(ids).logits) < 1e-4


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_incremental_decode_matches_full(tmp_path, dtype, tolerance):
    """Prefill + one-token steps through the cache equal a single full forward
    (in bf16 the steps take the CPU's one-query attention, the full forward SDPA)."""
    ours = GPTNeoX.from_pretrained(save(build_hf(), tmp_path), dtype=dtype)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    full = ours.forward_full(ids)
    ours.setup_cache(2, 16)
    key_mask = torch.ones(2, 16, dtype=torch.bool)
    pos = torch.arange(12).expand(2, 12)
    steps = [ours(ids[:, :8], pos[:, :8], torch.arange(8), key_mask, last_only=True)]
    for t in range(8, 12):
        kv_len = None if t % 2 else t + 1  # both the full-cache and the trimmed path
        steps.append(ours(ids[:, t : t + 1], pos[:, t : t + 1], torch.tensor([t]), key_mask, kv_len=kv_len))
    assert rel_err(torch.cat(steps, 1), full[:, 7:]) < tolerance


def test_bf16_one_query_attention_matches_fp32_sdpa():
    """The CPU's 16-bit decode attention against torch's fused kernel in fp32, with a ragged mask."""
    import torch.nn.functional as F

    from toolbox.runtime.model import decode_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, n, 32, generator=g) for n in (1, 70, 70))
    mask = torch.arange(70)[None, :] < torch.tensor([70, 41, 1])[:, None]  # row 2 sees one key only
    mask = mask[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    assert (got.float() - ref).abs().max() < 2e-2  # bf16 inputs: about 3 significant digits
    assert torch.equal(got[2].float(), v[2, :, :1].bfloat16().float())  # one visible key: its value, exactly
    assert (decode_attention(q, k, v, mask) - ref).abs().max() < 1e-5  # the same arithmetic in fp32


def test_padding_does_not_change_a_row(tmp_path):
    ours = GPTNeoX.from_pretrained(save(build_hf(rotary_pct=0.25), tmp_path))
    a = torch.randint(4, 512, (1, 9), generator=torch.Generator().manual_seed(4))
    alone = ours.forward_full(a)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), a], 1)
    left = ours.forward_full(padded, torch.arange(14)[None] >= 5)[:, 5:]
    right = ours.forward_full(torch.cat([a, torch.zeros(1, 5, dtype=torch.long)], 1),
                              torch.arange(14)[None] < 9)[:, :9]
    assert torch.isfinite(left).all()
    assert rel_err(left, alone) < 1e-5 and rel_err(right, alone) < 1e-5


def test_dtype_and_no_grad(tmp_path):
    ours = GPTNeoX.from_pretrained(save(build_hf(), tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ours.parameters())
    assert ours.rope_cos.dtype == torch.float32
    out = ours.forward_full(torch.tensor([[5, 6, 7]]))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 512)


def test_config_both_styles_and_errors(tmp_path):
    base = {"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
            "max_position_embeddings": 32}
    new = NeoXConfig.from_dict({**base, "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 500.0}})
    old = NeoXConfig.from_dict({**base, "rotary_pct": 0.5, "rotary_emb_base": 500})
    assert new == old and new.rotary_dim == 2 and new.rotary_base == 500.0
    assert NeoXConfig.from_dict({**base, "eos_token_id": [3, 4]}).eos_token_ids == (3, 4)

    f = tmp_path / "config.json"
    f.write_text(json.dumps({k: v for k, v in base.items() if k != "num_attention_heads"}))
    with pytest.raises(ValueError, match=r"config\.json.*'num_attention_heads'"):
        NeoXConfig.from_dir(tmp_path)
    f.write_text(json.dumps({**base, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        NeoXConfig.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        NeoXConfig.from_dir(tmp_path / "nowhere")


def test_weight_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save(build_hf(), tmp_path)
    sd = load_file(path / "model.safetensors")
    del sd["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ValueError, match="dense_h_to_4h.bias"):
        GPTNeoX.from_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPTNeoX.from_pretrained(path)
