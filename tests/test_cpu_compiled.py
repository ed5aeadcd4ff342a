"""The CPU backends' compiled decode step (`-o compile`, TOOLBOX_CPU_COMPILE) against transformers
and against the eager step.

Compiling takes seconds to tens of seconds (inductor), so each compiled model is built
once for the module: the embedded model in float32 (inductor's autotuned GEMMs) and in
int4 (torch's int4 kernel), both compiled ahead of time into libraries kept on disk; in
bfloat16 and int8 the same on a CPU with AMX (inductor's GEMMs on AMX tiles), elsewhere
oneDNN's and fbgemm's kernels as opaque operators in a graph of torch.compile's.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolbox.backend import GenerationParams, LoadOptions
from toolbox.backends import pick as pick_backend
from toolbox.errors import ToolboxError

EMBEDDED = Path(__file__).resolve().parent.parent / "toolbox" / "data" / "embedded"
NEW = 40


def _greedy(model, prompts, new=NEW):
    events = [e for step in model.generate_tokens(prompts, GenerationParams(
        max_new_tokens=new, min_new_tokens=new, temperature=0.0)) for e in step]
    return events


@pytest.fixture(scope="module")
def compiled(module_cache):
    model = pick_backend("cpu").load(EMBEDDED, LoadOptions(threads=2, extra={"compile": True}))
    assert model.describe()["compiled"] is True
    assert model._decode_fn.built  # a fresh cache: the libraries were built, for one row and for more
    # even for a one-shot load, both are built (no build in mid-run); the one for more rows is
    # loaded (with its copy of the weights) only when a batch runs
    assert list((module_cache / "compiled").glob("*/step-1.so")) and list((module_cache / "compiled").glob("*/step-2.so"))
    assert set(model._decode_fn._steps) == {1}
    return model


@pytest.fixture(scope="module")
def eager():
    return pick_backend("cpu").load(EMBEDDED, LoadOptions(threads=2, extra={"compile": "0"}))


@pytest.fixture(scope="module", params=["int4", "int8", "bfloat16"])
def compiled_other(request, module_cache):
    """A compiled model of the kinds whose step is not float32, and the same model eager."""
    from toolbox.runtime.aot import amx

    dtype = request.param
    backend = pick_backend("cpu" if dtype == "bfloat16" else "quant")
    model = backend.load(EMBEDDED, LoadOptions(dtype=dtype, threads=2, workload="generate",
                                               extra={"compile": "1", "quant_cache": "0"}))
    # ahead of time: int4 everywhere, int8 and bfloat16 where inductor's GEMMs have AMX; the library
    # picks greedily where it holds the output layer: all but int4, and int4 too for a small model on AMX
    assert model._decode_fn.ahead == (dtype if dtype == "int4" or amx() else None)
    assert (model._decode_fn.greedy is not None) == amx()
    eager = backend.load(EMBEDDED, LoadOptions(dtype=dtype, threads=2, extra={"compile": "0"}))
    return model, eager


def test_compiled_greedy_tokens_and_logprobs_equal_transformers(compiled):
    from transformers import GPTNeoXForCausalLM

    prompt = compiled.tokenizer.encode("吾輩は猫である。名前はまだ無い。")
    events = _greedy(compiled, [prompt])
    ours = [e.token_id for e in events]

    hf = GPTNeoXForCausalLM.from_pretrained(EMBEDDED, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert ours == out.sequences[0, len(prompt):].tolist()
    # logprobs are of the raw logits (transformers' min_new_tokens masks EOS only in its processed scores)
    ref = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ours)]
    assert max(abs(e.logprob - r) for e, r in zip(events, ref)) < 1e-4


def test_a_second_load_takes_the_step_from_disk_without_the_compiler(compiled, module_cache, eager):
    """Another process loads the library the fixture built (no compiling, no dynamo) and decodes
    prompts of other lengths, over caches of other sizes, as the eager step does: the library
    has no guards, so every size it was exported with must really be dynamic."""
    tok = compiled.tokenizer
    prompts = [tok.encode("吾輩は猫である。" * 20), tok.encode("猫")]  # the long one crosses 64 and 128 slots
    code = ("import json, sys; from pathlib import Path; from toolbox.backend import LoadOptions, GenerationParams; "
            "from toolbox.backends import pick; "
            f"m = pick('cpu').load(Path({str(EMBEDDED)!r}), LoadOptions(threads=2, extra={{'compile': '1'}})); "
            f"out = [[(e.token_id, e.logprob) for s in m.generate_tokens([p], GenerationParams(max_new_tokens=70, "
            f"min_new_tokens=70, temperature=0.0)) for e in s] for p in {prompts!r}]; "
            "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules, 'out': out}))")
    env = {**os.environ, "TOOLBOX_CACHE": str(module_cache)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "loaded from the cache" in run.stderr, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["dynamo"] is False
    for prompt, ours in zip(prompts, result["out"]):
        ref = _greedy(eager, [prompt], new=70)
        assert [t for t, _ in ours] == [e.token_id for e in ref]
        assert max(abs(lp - e.logprob) for (_, lp), e in zip(ours, ref)) < 1e-4


def test_a_damaged_library_is_built_again(compiled, module_cache, eager, tmp_path, monkeypatch):
    """A library file that does not load (a disk error, a copy cut short) is rebuilt, not fatal."""
    shutil.copytree(module_cache / "compiled", tmp_path / "compiled")
    (library,) = (tmp_path / "compiled").glob("*/step-1.so")
    library.write_bytes(b"not a shared library")
    monkeypatch.setenv("TOOLBOX_CACHE", str(tmp_path))
    model = pick_backend("cpu").load(EMBEDDED, LoadOptions(threads=2, extra={"compile": True}))
    assert model._decode_fn.built
    prompt = [compiled.tokenizer.encode("吾輩は猫である。")]
    assert [e.token_id for e in _greedy(model, prompt)] == [e.token_id for e in _greedy(eager, prompt)]
    again = pick_backend("cpu").load(EMBEDDED, LoadOptions(threads=2, extra={"compile": True}))
    assert not again._decode_fn.built  # the rebuilt file loads


def test_the_step_library_is_kept_per_checkpoint_threads_and_kind(tmp_path, monkeypatch):
    """A library holds frozen weights and code built for one thread count: a changed checkpoint
    or another thread count must not reuse it."""
    from toolbox.runtime.aot import library_path
    from toolbox.runtime.quant import cache_key

    monkeypatch.setenv("TOOLBOX_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "model"
    shutil.copytree(EMBEDDED, ckpt)
    key = cache_key(ckpt, "step-float32", "cpu")
    one, more = library_path(key, 1), library_path(key, 2)
    assert one != more and one.parent == more.parent
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert library_path(key, 1) != one
    finally:
        torch.set_num_threads(threads)
    weights = next(p for p in ckpt.iterdir() if p.suffix in (".safetensors", ".bin"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert library_path(cache_key(ckpt, "step-float32", "cpu"), 1) != one


def test_the_library_refuses_inputs_it_was_not_built_for(compiled):
    step = compiled._decode_fn
    m = compiled.module
    cache = [(k.transpose(2, 3).contiguous().transpose(2, 3), v) for k, v in m.new_cache(1, 128)]
    args = (torch.tensor([[5]]), torch.tensor([[3]]), torch.tensor([3]), None, 4)
    with torch.inference_mode():
        step(*args, m.new_cache(1, 128))  # contiguous: fine
        with pytest.raises(ValueError, match="contiguous"):
            step(*args, cache)
        with pytest.raises(ValueError, match="contiguous"):
            step(*args, [(k.bfloat16(), v.bfloat16()) for k, v in m.new_cache(1, 128)])
        one_row = step._steps[1]  # the library of one row, handed two
        two = m.new_cache(2, 128)
        with pytest.raises(ValueError, match="takes one row, not 2"):
            one_row(torch.tensor([[5], [6]]), torch.tensor([[3], [3]]), torch.tensor([[3], [3]]),
                    torch.ones(2, 128, dtype=torch.bool), 4, two)


def test_batches_and_the_continuous_batcher_decode_like_the_eager_step(compiled_other):
    """Compiled at load for one row and for several (a long run of generation): batches, the
    continuous batcher and a span past 64 slots (the 16-bit attention rounds it) reuse those
    steps (torch.compile's graphs do not recompile)."""
    import torch._dynamo

    from toolbox.batching import SequenceRequest
    from toolbox.runtime.loaded import RuntimeModel

    model, eager = compiled_other
    step = model._decode_fn
    tok = model.tokenizer
    prompts = [tok.encode("吾輩は猫である。"), tok.encode("名前はまだ無い。どこで生れたか")]
    with torch._dynamo.config.patch(error_on_recompile=True):
        a, b = _greedy(model, prompts, new=12), _greedy(eager, prompts, new=12)
        # one row, past 64 slots; where the library picks greedily, as its own logits sampled do
        long = [tok.encode("吾輩は猫である。" * 12)]
        one = _greedy(model, long, new=40)
        plain = _greedy(RuntimeModel(model.module, tok, model.info, decode_fn=lambda *args: step(*args)), long, 40)
    assert [e.token_id for e in one] == [e.token_id for e in plain]
    assert max(abs(x.logprob - y.logprob) for x, y in zip(one, plain)) < 1e-5
    if step.ahead:  # the library for more rows was built at load and loaded by the first batch
        assert step._prepared == {2: True} and step._steps[2].built is False
    assert [e.token_id for e in a] == [e.token_id for e in b]
    # bf16 fused vs eager; int8: bfloat16 activations vs fbgemm's int8 ones
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b)) < 0.05

    out = {}
    for m in (model, eager):
        batcher = m.batcher(4)
        for i, p in enumerate(prompts):
            batcher.add(SequenceRequest(i, p, GenerationParams(max_new_tokens=10, min_new_tokens=10,
                                                               temperature=0.0)))
        tokens = {0: [], 1: []}
        with torch._dynamo.config.patch(error_on_recompile=True):
            while batcher.pending():
                for e in batcher.step():
                    tokens[e.seq].append(e.token_id)
        out[m is model] = tokens
    assert out[True] == out[False]


def test_compile_auto_follows_the_workload_and_bad_settings_are_one_line_errors(monkeypatch):
    from toolbox.backends.cpu import compile_wanted

    cpu = pick_backend("cpu")
    monkeypatch.delenv("TOOLBOX_CPU_COMPILE", raising=False)
    assert not compile_wanted(LoadOptions())  # one-shot commands stay eager
    assert compile_wanted(LoadOptions(workload="generate"))
    assert not compile_wanted(LoadOptions(workload="score"))
    assert not compile_wanted(LoadOptions(workload="generate", extra={"compile": "0"}))
    assert compile_wanted(LoadOptions(extra={"compile": True}))
    monkeypatch.setenv("TOOLBOX_CPU_COMPILE", "1")
    assert compile_wanted(LoadOptions())
    assert not compile_wanted(LoadOptions(extra={"compile": "off"}))  # the option wins over the environment
    monkeypatch.setenv("TOOLBOX_CPU_COMPILE", "maybe")
    with pytest.raises(ToolboxError, match="TOOLBOX_CPU_COMPILE: expected auto, 1 or 0"):
        cpu.load(EMBEDDED, LoadOptions(threads=1))
    with pytest.raises(ToolboxError, match="option compile: expected auto, 1 or 0"):
        pick_backend("quant").load(EMBEDDED, LoadOptions(threads=1, extra={"compile": "x"}))


def test_eager_loading_does_not_import_the_compiler():
    """torch._dynamo costs about a second and 66 MB to import: the eager path must not need it."""
    import subprocess

    code = ("import sys; from pathlib import Path; from toolbox.backend import LoadOptions, GenerationParams; "
            f"from toolbox.backends import pick; e = Path({str(EMBEDDED)!r}); "
            "m = pick('quant').load(e, LoadOptions(dtype='int4', extra={'quant_cache': '0'})); "
            "list(m.generate_tokens([[5, 6]], GenerationParams(max_new_tokens=3))); "
            "m = pick('cpu').load(e, LoadOptions()); "
            "list(m.generate_tokens([[5, 6]], GenerationParams(max_new_tokens=3))); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_batch_files_compile_by_default_and_one_shot_commands_do_not(run_toolbox, tmp_path):
    """`generate --input` announces a long run (compiled, with its one-line note); a single
    prompt stays eager; the records are the same either way."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "吾輩は猫である。{i}"}}\n' for i in range(3)), encoding="utf-8")
    auto = {"TOOLBOX_CPU_COMPILE": ""}  # unset: the default, auto
    out = {}
    for name, env in (("auto", auto), ("eager", {"TOOLBOX_CPU_COMPILE": "0"})):
        path = tmp_path / f"{name}.jsonl"
        r = run_toolbox("generate", "--input", str(prompts), "--output", str(path), "--max-new-tokens", "12",
                        "--temperature", "0", env=env, timeout=300)
        assert r.returncode == 0, r.stderr.decode()
        assert (b"decode step compiled by inductor" in r.stderr) == (name == "auto"), r.stderr.decode()
        out[name] = [json.loads(line)["token_ids"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert out["auto"] == out["eager"]
    r = run_toolbox("generate", "吾輩は猫である。", "--max-new-tokens", "4", env=auto)
    assert r.returncode == 0 and b"compiled" not in r.stderr, r.stderr.decode()


def test_serve_decodes_through_the_compiled_step_by_default(compiled, module_cache, eager):
    """`toolbox serve` is a long run of generation: its model process loads the compiled steps
    (here from the cache the fixture built), with the one-line note, and a batch of two
    requests decodes as the eager step does."""
    import concurrent.futures

    import httpx
    from serve_fixtures import SERVED_NAME, ServerProcess

    server = ServerProcess(str(EMBEDDED), "--threads", "2",
                           env={"TOOLBOX_CPU_COMPILE": "", "TOOLBOX_CACHE": str(module_cache)})
    try:
        server.wait_ready(300)
        assert "decode step compiled by inductor" in server.log(), server.log()
        tok = compiled.tokenizer
        prompts = [tok.encode("吾輩は猫である。"), tok.encode("名前はまだ無い。")]

        def complete(ids):
            r = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
                "model": SERVED_NAME, "prompt": ids, "max_tokens": 12, "min_tokens": 12, "temperature": 0,
                "return_token_ids": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = list(pool.map(complete, prompts))
    finally:
        server.stop()
    assert got == [[e.token_id for e in _greedy(eager, [p], new=12)] for p in prompts]


@pytest.mark.parametrize("kind", ["bfloat16 prepacked", "int8 dynamic"])
def test_opaque_linears_run_the_modules_own_kernel_and_go_with_them(kind):
    """The opaque operator calls a Linear's kernel directly (not through its forward): the output
    must be bit-identical to the module's own forward, and the kernel (holding the packed weight)
    must be dropped when the Linear is."""
    import gc
    import warnings

    from toolbox.runtime import cpu

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    if kind.startswith("bfloat16"):
        if not cpu.packing_available():
            pytest.skip("torch built without oneDNN")
        module = cpu.pack_linears(torch.nn.Sequential(linear.bfloat16()))
        x = torch.randn(3, 1, 64).bfloat16()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                           dtype=torch.qint8)
        x = torch.randn(3, 1, 64) * 4
    with torch.inference_mode():
        expected = module(x)
        before = len(cpu._KERNELS)
        cpu.opaque_linears(module)
        assert len(cpu._KERNELS) == before + 1
        got = module(x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    del module
    gc.collect()
    assert len(cpu._KERNELS) == before


def test_bfloat16_and_int8_go_ahead_of_time_only_with_amx(monkeypatch):
    """Inductor's bfloat16 and weight-only int8 GEMMs are fast on AMX tiles and slow without
    them (docs/performance.md): without AMX those kinds stay on oneDNN's and fbgemm's kernels."""
    from toolbox.runtime import aot
    from toolbox.runtime.loaded import load_module
    from toolbox.runtime.quant import quantize_cpu_int8

    bf16 = load_module(EMBEDDED, "cpu", torch.bfloat16)
    int8 = quantize_cpu_int8(load_module(EMBEDDED, "cpu", torch.float32))
    fp32 = load_module(EMBEDDED, "cpu", torch.float32)
    for has in (False, True):
        monkeypatch.setattr(aot, "amx", lambda has=has: has)
        assert aot.scheme(bf16) == ("bfloat16" if has else None)
        assert aot.scheme(int8) == ("int8" if has else None)
        assert aot.scheme(fp32) == "float32"
    monkeypatch.setattr(aot, "INT8_LIMIT", 1 << 20)  # a larger int8 model: fbgemm in torch.compile's graph
    assert aot.scheme(int8) is None and aot.scheme(bf16) == "bfloat16"
    monkeypatch.setattr(aot, "SIZE_LIMIT", 1 << 20)  # past the limit: torch.compile's path
    assert aot.scheme(bf16) is None


def test_float32_weights_past_the_cache_run_on_the_faster_gemms_measured(neox3, tmp_path, monkeypatch):
    """Weights larger than the CPU's caches: both kinds of GEMM are built and timed, the faster
    is kept, its name written beside it for the note, and it decodes as the eager step does;
    weights that fit: inductor's alone."""
    from toolbox.runtime import aot

    monkeypatch.setenv("TOOLBOX_CACHE", str(tmp_path))
    size = sum(m.weight.nbytes for m in aot._linears(neox3))
    monkeypatch.setattr(aot, "_cache_bytes", lambda: size - 1)
    key = "measured"
    step = aot.AOTStep(neox3, 1, key, "float32")
    record = json.loads(aot.library_path(key, 1).with_suffix(".json").read_text())
    names = [name for name, _ in aot.CANDIDATES["float32"]]
    assert sorted(record["step_seconds"]) == sorted(names) and all(t > 0 for t in record["step_seconds"].values())
    assert record["gemms"] == min(record["step_seconds"], key=record["step_seconds"].get) == step.gemms
    ids, pos, cache_pos, key_mask, span, _ = aot.example_inputs(neox3, 1)
    ours, ref = neox3.new_cache(1, key_mask.shape[1]), neox3.new_cache(1, key_mask.shape[1])
    with torch.inference_mode():
        got = step(ids, pos, cache_pos, key_mask, span.shape[0], ours)
        want = neox3(ids, pos, cache_pos[0], key_mask, kv_len=span.shape[0], cache=ref)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[0][0], ref[0][0], rtol=1e-4, atol=1e-4)  # the new keys, written in place

    monkeypatch.setattr(aot, "_cache_bytes", lambda: size)
    assert aot._candidates(neox3, "float32", 1) == aot.CANDIDATES["float32"][:1]
    assert aot._candidates(neox3, "float32", 2) == aot.CANDIDATES["float32"]  # batches: both, whatever the size


def test_the_float32_batch_step_runs_on_the_gemms_faster_at_a_serving_batch(compiled, module_cache, eager):
    """The library for batches of rows was built on both kinds of GEMM and timed at `BATCH_ROWS`
    rows; the one kept decodes a ragged batch as the eager step does."""
    from toolbox.runtime import aot

    records = [json.loads(p.read_text()) for p in (module_cache / "compiled").glob("*/step-2.json")]
    (record,) = [r for r in records if "step_seconds" in r]  # the float32 one: the other kinds have one candidate
    names = [name for name, _ in aot.CANDIDATES["float32"]]
    assert sorted(record["step_seconds"]) == sorted(names)
    assert record["gemms"] == min(record["step_seconds"], key=record["step_seconds"].get)
    tok = compiled.tokenizer
    prompts = [tok.encode(t) for t in ("吾輩は猫である。", "名前はまだ無い。どこで生れたかとんと見当がつかぬ。", "猫")]
    model = pick_backend("cpu").load(EMBEDDED, LoadOptions(threads=2, extra={"compile": True}))
    assert not model._decode_fn.built  # the fixture's libraries, from the cache
    assert record["gemms"] in model._decode_fn.kind  # the load's note names the batch's GEMMs too
    ours, ref = _greedy(model, prompts), _greedy(eager, prompts)
    library = aot.library_path(model._decode_fn.key, 2)
    assert model._decode_fn._steps[2].gemms == record["gemms"], (library, torch.get_num_threads())  # it ran
    assert [(e.seq, e.token_id) for e in ours] == [(e.seq, e.token_id) for e in ref]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(ours, ref)) < 1e-4


def test_the_steps_own_greedy_choice_equals_sampling_its_logits(compiled):
    """A float32 library picks greedily itself (`pick_greedy`, the loop's ``sample`` skipped): the
    same tokens and logprobs as sampling its logits, with EOS banned before min_new_tokens and
    ids past the tokenizer's vocabulary never chosen."""
    from toolbox.runtime.generation import Generation
    from toolbox.runtime.sampling import SamplingParams

    step, m = compiled._decode_fn, compiled.module
    assert step.greedy is not None
    prompt = compiled.tokenizer.encode("吾輩は猫である。名前はまだ無い。")

    def run(decode_fn, **kw):
        out = Generation(m, [prompt], max_new_tokens=24, sampling=SamplingParams(temperature=0.0),
                         decode_fn=decode_fn, **kw)
        return [(t.token_id, t.logprob, t.finish_reason) for s in out for t in s.tokens]

    free = [t for t, _, _ in run(step)]
    eos, cut = free[3], max(free[4:])  # the model's own choices, then forbidden
    kw = {"eos_token_ids": [eos], "min_new_tokens": 10, "sampled_vocab": cut}
    fused = run(step, **kw)
    plain = run(lambda *args: step(*args), **kw)  # no `greedy`: the logits, then `sample`
    assert [t for t, _, _ in fused] == [t for t, _, _ in plain]
    assert max(abs(a[1] - b[1]) for a, b in zip(fused, plain)) < 1e-5
    assert all(t < cut for t, _, _ in fused) and eos not in [t for t, _, _ in fused[:10]]
    assert fused[0][0] == free[0] and fused != run(step)  # the constraints changed the run
