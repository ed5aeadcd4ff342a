"""The GPU fast path, as far as a CPU can run it.

The CUDA-graph capture itself needs a GPU; everything around it runs here: the
benchmark script in its CPU mode, the graphed decoder's eager stand-in (the exact inputs
a graph sees: full or bucketed cache span with the mask), the torch.compile tracing of
the step (fullgraph, with the Inductor-free "eager" backend), the GPU backends' glue,
and the quantized-weight cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, _clean_env
from runtime_fixtures import build_hf, save

from toolbox.backend import GenerationParams, LoadOptions
from toolbox.errors import ToolboxError
from toolbox.runtime.generation import Generation
from toolbox.runtime.graphs import DecoderOptions, GraphedDecoder, fast_runtime_model
from toolbox.runtime.model import GPTNeoX
from toolbox.runtime.sampling import SamplingParams

HAS_CUDA_DEVICE = os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(neox3):
    return neox3


def _tokens(model, prompts, decode_fn=None, n=128, penalty=1.0):
    out: dict[int, list[int]] = {}
    sampling = SamplingParams(temperature=0, repetition_penalty=penalty)
    for step in Generation(model, prompts, max_new_tokens=n, min_new_tokens=n, sampling=sampling, decode_fn=decode_fn):
        for t in step.tokens:
            out.setdefault(t.seq, []).append(t.token_id)
    return [out[i] for i in range(len(prompts))]


B1 = [list(range(100, 110))]
RAGGED = [[11, 12, 13], list(range(20, 37)), [99]]


# --- the benchmark script -------------------------------------------------------


def test_bench_gpu_cpu_mode(tmp_path):
    """bench/gpu.py --cpu runs every section a CPU can run and writes the documented JSON."""
    out = tmp_path / "gpu-cpu.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--cpu", "--output", str(out)],
                       capture_output=True, text=True, env=_clean_env(), cwd=REPO, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "cpu" and r["peak_memory_bytes"] is None
    assert r["bandwidth_gbs"] > 0 and r["parameters"] > 0 and r["weight_bytes"] > 0 and r["roofline_tokens_per_s"] > 0
    errors = {k: v.get("error") for k, v in r["sections"].items() if v["status"] == "error"}
    assert not errors
    ran = {k for k, v in r["sections"].items() if v["status"] == "ok"}
    assert {"bandwidth", "build", "baseline_generate", "ours_fp16", "ttft", "scoring", "parity", "quant_int8",
            "quant_cache_roundtrip"} <= ran
    assert all(v["status"] == "skipped" and v["reason"] for k, v in r["sections"].items() if "compile" in k)
    rows = {row["name"]: row for row in r["rows"]}
    for name in ("ours fp32 eager stand-in b1", "ours fp32 eager stand-in b4", "quant int8 plain b1"):
        row = rows[name]
        assert row["ours_tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
        assert row["ratio"] > 0 and row["pct_roofline"] > 0
    assert r["ttft_ms"]["prompt_tokens"] == 512 and r["ttft_ms"]["ours"] > 0 and r["ttft_ms"]["baseline"] > 0
    assert r["scoring"]["window_tokens"] == 2048 and r["scoring"]["ours_tokens_per_s"] > 0
    par = r["parity"]
    fp32 = [v for k, v in par.items() if k.startswith("fp32_tokens_fast")]
    assert len(fp32) == 4 and all(v["identical"] and v["tokens"] == 128 for v in fp32)
    assert par["bfloat16_logits"]["fast_vs_eager_rel"] < 2e-2
    assert par["quant_cache"]["int8"]["identical_logits"]
    assert set(r["targets"]) >= {"fp16_b1_pct_roofline", "fp16_b32_tokens_per_s", "int8_vs_fp16_b1",
                                 "int4_vs_fp16_b1", "ttft_512_ms", "fp32_greedy_identical_128",
                                 "low_precision_logits_rel"}
    assert "% roofline" in p.stdout and "wrote" in p.stdout


# --- the graphed decoder's eager stand-in ------------------------------------------


@pytest.mark.parametrize("prompts", [B1, RAGGED], ids=["b1", "ragged-b3"])
@pytest.mark.parametrize("bucket", [None, 16])
def test_graphed_decoder_eager_matches_default_path(model, prompts, bucket):
    """128 greedy fp32 tokens through the graph's inputs (whole/bucketed cache + mask) = the plain path."""
    dec = GraphedDecoder(model, kv_bucket=bucket)
    assert not dec.capture  # CPU: eager stand-in
    for penalty in (1.0, 1.3):
        ref = _tokens(model, prompts, penalty=penalty)
        assert _tokens(model, prompts, dec, penalty=penalty) == ref
        assert len(set(ref[0])) > 5  # the check means something: the output is varied


def test_graphed_decoder_follows_the_cache(model):
    """A new batch size (a new cache) works through the same decoder; misuse is reported."""
    dec = GraphedDecoder(model, kv_bucket=8)
    assert dec.span(3, 64) == 8 and dec.span(9, 64) == 16 and dec.span(60, 64) is None and dec.span(None, 64) is None
    for prompts in (RAGGED, B1, RAGGED):
        assert _tokens(model, prompts, dec, n=20) == _tokens(model, prompts, n=20)
    model.setup_cache(2, 32)
    ids = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="2 rows"):
        dec(ids, ids, torch.tensor([0]), None, 1)
    model.drop_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        dec(ids, ids, torch.tensor([0]), None, 1)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDecoder(model, capture=True)


def test_graph_bookkeeping_with_a_stand_in_for_cuda(model, monkeypatch):
    """The capture path (static buffers, one graph per batch and span, re-capture when the
    cache is reallocated) with CPU stand-ins for the CUDA calls: a "graph" re-runs the
    recorded step on the same static buffers and cache tensors, as a replay would, so a
    graph kept past its cache would decode wrongly."""
    import toolbox.runtime.graphs as graphs

    class Graph:
        def replay(self):
            self.out.copy_(self.fn())

    def record(graph, pool, fn):
        graph.fn, graph.out = fn, fn().clone()
        return graph.out

    monkeypatch.setattr(graphs, "_warm_up", lambda fn, n, device: [fn() for _ in range(n)])
    monkeypatch.setattr(graphs, "_new_pool", lambda: "pool")
    monkeypatch.setattr(graphs, "_new_graph", Graph)
    monkeypatch.setattr(graphs, "_record", record)
    dec = GraphedDecoder(model, kv_bucket=16)
    dec.capture = True
    for prompts in (RAGGED, B1, RAGGED):  # a new batch size each time: a new cache
        assert _tokens(model, prompts, dec, n=20) == _tokens(model, prompts, n=20)
    # ragged: 37 slots, spans 32 and the whole cache; b1: 30 slots, spans 16 and the whole cache
    assert dec.captures == 6
    assert _tokens(model, RAGGED, dec, n=20) == _tokens(model, RAGGED, n=20)
    assert dec.captures == 6  # the same cache again: the graphs are reused

    def broken(graph, pool, fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_record", broken)
    dec = GraphedDecoder(model, kv_bucket=16)
    dec.capture = True
    assert _tokens(model, B1, dec, n=20) == _tokens(model, B1, n=20)  # decodes without graphs instead
    assert not dec.capture and "not permitted" in dec.capture_error and dec.captures == 0
    model.drop_cache()


def test_compiled_step_traces_as_one_graph(model):
    """torch.compile(fullgraph=True) of the step traces without a graph break (the Inductor
    backend and the capture need CUDA; the "eager" backend checks the tracing alone)."""
    dec = GraphedDecoder(model, compile=True, compile_backend="eager")
    assert dec.kv_bucket is None  # compile: one shape per batch size
    assert _tokens(model, RAGGED, dec, n=24) == _tokens(model, RAGGED, n=24)
    assert dec.compiled and dec.compile_error is None


def test_compiled_step_traces_with_torchao_int8(tmp_path):
    """The quant backend's CUDA int8 layout (torchao Int8Tensor, bf16) also traces as one graph."""
    pytest.importorskip("torchao")
    import toolbox.runtime.quant as toolbox_quant
    from toolbox.runtime.loaded import weight_bytes

    m = GPTNeoX.from_pretrained(save(build_hf(num_hidden_layers=2), tmp_path), dtype=torch.bfloat16)
    ref = _tokens(m, B1, n=12)
    bf16_bytes = weight_bytes(m)
    toolbox_quant.quantize_cuda(m, "int8")
    assert weight_bytes(m) < 0.7 * bf16_bytes  # sizes torchao's tensor subclasses
    assert type(m.embed_out.weight).__name__ == "Int8Tensor"
    assert m.layers[0].attention.query_key_value.bias.dtype == torch.bfloat16
    eager = _tokens(m, B1, n=12)
    assert len(eager) == 1 and len(set(ref[0]) & set(eager[0])) > 0
    dec = GraphedDecoder(m, compile=True, compile_backend="eager")
    assert _tokens(m, B1, dec, n=12) == eager
    assert dec.compiled and dec.compile_error is None
    # torchao's weights go through the safetensors cache format (no pickle) and come back equal
    toolbox_quant.save_quantized(m, tmp_path / "q", "int8", tmp_path)
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["model.safetensors", "source.json"]
    again = toolbox_quant.load_quantized(tmp_path / "q", tmp_path, "cpu")
    assert _tokens(again, B1, n=12) == eager


def test_decoder_options(monkeypatch):
    from toolbox.backends.cuda import CUDABackend
    from toolbox.backends.gpu import decoder_options
    from toolbox.errors import ToolboxError

    b = CUDABackend()
    for var in ("TOOLBOX_CUDA_GRAPHS", "TOOLBOX_CUDA_COMPILE", "TOOLBOX_CUDA_KV_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    d = decoder_options(b, LoadOptions())
    assert d.graphs and not d.compile
    assert decoder_options(b, LoadOptions(), default_compile=True).compile
    extra = {"graphs": False, "compile": "1", "kv_bucket": "none"}
    assert decoder_options(b, LoadOptions(extra=extra)) == DecoderOptions(False, True, None)
    monkeypatch.setenv("TOOLBOX_CUDA_COMPILE", "yes")
    monkeypatch.setenv("TOOLBOX_CUDA_KV_BUCKET", "512")
    d = decoder_options(b, LoadOptions())
    assert d.compile and d.kv_bucket == 512
    assert not decoder_options(b, LoadOptions(extra={"compile": False})).compile  # options win over the environment
    with pytest.raises(ToolboxError, match="option graphs: expected a boolean"):
        decoder_options(b, LoadOptions(extra={"graphs": "maybe"}))
    with pytest.raises(ToolboxError, match="TOOLBOX_CUDA_KV_BUCKET: expected a number"):
        monkeypatch.setenv("TOOLBOX_CUDA_KV_BUCKET", "-3")
        decoder_options(b, LoadOptions())


def test_fast_runtime_model_on_cpu(tiny_checkpoint):  # noqa: F811
    """The GPU backends' LoadedModel, run on the CPU: same tokens as the cpu backend, cache in buckets."""
    from toolbox.backends import registered as backends
    from toolbox.runtime.loaded import checkpoint_tokenizer, load_module

    cpu = backends()["cpu"].load(tiny_checkpoint, LoadOptions(dtype="float32"))
    module = load_module(tiny_checkpoint, "cpu", torch.float32)
    fast = fast_runtime_model(module, checkpoint_tokenizer(tiny_checkpoint), {"backend": "test"}, DecoderOptions())
    params = GenerationParams(max_new_tokens=20, min_new_tokens=20, temperature=0.0, n=2)
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500]]

    def run(m):
        return [[(e.seq, e.token_id, e.finish_reason) for e in step] for step in m.generate_tokens(prompts, params)]

    assert run(fast) == run(cpu)
    # 5 + 20 slots rounded up to 256, capped at the context of 96 (on the CPU the runtime's own
    # rounding, `GPTNeoX.cache_slots`, may make it larger)
    assert module.cache_shape[0] == 4 and module.cache_shape[1] >= 96
    info = fast.describe()
    assert info["graphs"] is False and info["cuda_graphs"] is False and info["compiled"] is False
    assert "memory_allocated" not in info  # device memory is reported on CUDA only
    with pytest.raises(ToolboxError):
        fast.generate_tokens([[]], params)


# --- the backends on a machine without CUDA --------------------------------------


@pytest.mark.skipif(HAS_CUDA_DEVICE, reason="this machine has an NVIDIA device")
def test_cuda_backend_reports_no_cuda_device(tiny_checkpoint):  # noqa: F811
    from toolbox.backends import registered as backends

    cuda = backends()["cuda"]
    assert cuda.unavailable_reason() == "no CUDA device"
    with pytest.raises(ToolboxError, match="no CUDA device"):
        cuda.load(tiny_checkpoint, LoadOptions())
    with pytest.raises(ToolboxError, match="cuda"):
        backends()["quant"].load(tiny_checkpoint, LoadOptions(device="cuda", dtype="int4"))


# --- the quantized-weight cache ------------------------------------------------------


def test_cpu_int8_keeps_a_16_bit_input_embedding(tmp_path, monkeypatch):
    """int8 on CPU from a fp16 checkpoint: the embedding stays fp16 (half the memory), exactly
    the stored values, through a fresh quantization and through the cache alike."""
    from toolbox.backends.quant import QuantBackend

    monkeypatch.setenv("TOOLBOX_CACHE", str(tmp_path / "cache"))
    hf = build_hf(vocab_size=8000, max_position_embeddings=96, init=0.05).half()
    ckpt = save(hf, tmp_path / "fp16")
    shutil.copy(REPO / "toolbox" / "data" / "embedded" / "spiece.model", ckpt / "spiece.model")
    stored = hf.gpt_neox.embed_in.weight.detach()
    on = LoadOptions(extra={"quant_cache": True})
    fresh, cached = QuantBackend().load(ckpt, on), QuantBackend().load(ckpt, on)
    assert cached.info["quantized_cache"] == "hit"
    for loaded in (fresh, cached):
        weight = loaded.module.embed_in.weight
        assert weight.dtype == torch.float16 and torch.equal(weight, stored)
        assert loaded.module.final_layer_norm.weight.dtype == torch.float32  # computes in fp32
    params = GenerationParams(max_new_tokens=8, min_new_tokens=8, temperature=0.0)
    toks = [[[e.token_id for e in step] for step in m.generate_tokens([[5, 6, 7]], params)] for m in (fresh, cached)]
    assert toks[0] == toks[1]


def test_quantized_weight_cache_round_trip(tiny_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    import toolbox.runtime.quant as toolbox_quant
    from toolbox.backends.quant import QuantBackend

    monkeypatch.setenv("TOOLBOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TOOLBOX_QUANT_CACHE", raising=False)
    backend = QuantBackend()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    assert not toolbox_quant.cache_wanted(ckpt, None)  # auto: a tiny checkpoint is not worth caching
    on = LoadOptions(extra={"quant_cache": True})

    first = backend.load(ckpt, on)
    assert first.info["quantized_cache"] == "written"
    entry = toolbox_quant.quantized_cache_dir(ckpt, "int8", "cpu")
    assert entry.parent == tmp_path / "cache" / "quantized" and (entry / "model.layers.0.pt").is_file()
    assert json.loads((entry / "source.json").read_text())["scheme"] == "int8"

    def no_quantizing(module):
        raise AssertionError("the cached weights should have been used")

    with monkeypatch.context() as m:
        m.setattr(toolbox_quant, "quantize_cpu_int8", no_quantizing)
        second = backend.load(ckpt, on)
    assert second.info["quantized_cache"] == "hit"
    seqs = [list(range(5, 60)), [7, 8, 9, 10]]
    a, b = first.score(seqs), second.score(seqs)
    assert [s.logprobs for s in a] == [s.logprobs for s in b] and [s.ranks for s in a] == [s.ranks for s in b]
    params = GenerationParams(max_new_tokens=16, min_new_tokens=16, temperature=0.0)
    toks = [[[e.token_id for e in step] for step in m.generate_tokens([[5, 6, 7]], params)] for m in (first, second)]
    assert toks[0] == toks[1]
    assert first.describe()["weight_bytes"] == second.describe()["weight_bytes"]

    # the key follows the checkpoint: rewritten weights miss the old entry
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    assert toolbox_quant.quantized_cache_dir(ckpt, "int8", "cpu") != entry
    # a damaged entry is ignored and rewritten
    entry = toolbox_quant.quantized_cache_dir(ckpt, "int8", "cpu")
    backend.load(ckpt, on)
    (entry / "model.layers.1.pt").write_bytes(b"not a checkpoint")
    assert backend.load(ckpt, on).info["quantized_cache"] == "written"
    assert backend.load(ckpt, on).info["quantized_cache"] == "hit"
    (entry / "model.embed_out.pt").unlink()  # a part missing: the same
    assert backend.load(ckpt, on).info["quantized_cache"] == "written"
    assert backend.load(ckpt, on).info["quantized_cache"] == "hit"
    assert backend.load(ckpt, LoadOptions(extra={"quant_cache": "0"})).info["quantized_cache"] == "off"
