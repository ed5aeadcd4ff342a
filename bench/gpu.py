"""GPU benchmark of the `cuda` and `quant` fast paths against transformers' eager `generate`.

In one process, on one device:

1. device copy bandwidth (device-to-device copy, bytes read + written; on the CPU a host
   memcpy), which gives the batch-1 decode roofline = bandwidth / weight bytes;
2. the 3.6B shape (hidden 2816, 36 layers, 22 heads, intermediate 11264, vocab 32000)
   with random weights built directly on the device (speed does not depend on the
   values), shared by transformers' model and ours;
3. transformers' eager `generate` (the baseline) at batch 1, 8, 32;
4. ours (`GraphedDecoder`: static cache, CUDA graphs, sampling on the device) in fp16 at
   batch 1, 8, 32, plus the graph replay alone at batch 1 (no generation loop);
5. time to first token for a 512-token prompt, ours and transformers;
6. scoring throughput over 2048-token windows, ours (`score`) and transformers (forward + loss);
7. `quant` int8 and int4 (torchao weight-only, bf16 activations) at batch 1, with and
   without torch.compile;
8. fp16 with torch.compile before the capture at batch 1 and 32;
9. parity: 128 greedy tokens of the fast path against the plain eager path in fp32
   (batch 1 and a ragged batch of 3), fp16 decode logits of both, and a save/reload of
   quantized weights through the quant backend's cache format;
10. peak device memory.

Generation is forced to a fixed length (min_new_tokens = max_new_tokens, no EOS).
Decode tokens/s = batch * (N - 1) / (time of N tokens - time of 1 token): prefill and
the first token are left out, for us and for the baseline alike. % of roofline = decode
tokens/s / (batch * bandwidth / the row's own weight bytes). Each section is guarded:
an error is recorded in the JSON and the run goes on; the JSON is rewritten after every
section, so a run cut short still leaves its results. ``--budget`` seconds: sections
that would not fit are skipped (and say so), the slow compile sections last.

    python bench/gpu.py                    # full run on CUDA (about 6 minutes)
    python bench/gpu.py --quick            # fewer tokens and compile runs (about 3 minutes)
    python bench/gpu.py --cpu              # small shape on the CPU (< 60 s; CI runs it)

Writes bench/results/gpu.json (CUDA) or bench/results/gpu-cpu.json (--cpu), or --output.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "plugins", ROOT):  # runs from a checkout without installing it (the GPU machine)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

SHAPE_36B = dict(vocab_size=32000, hidden_size=2816, num_hidden_layers=36, num_attention_heads=22,
                 intermediate_size=11264, max_position_embeddings=2048, rotary_pct=1.0,
                 use_parallel_residual=False, tie_word_embeddings=False, bos_token_id=2, eos_token_id=3)
# parity runs: the 3.6B's width, 2 layers, larger init (peaked logits: greedy has clear winners)
SHAPE_PARITY_GPU = {**SHAPE_36B, "num_hidden_layers": 2}
SHAPE_CPU = dict(vocab_size=8000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=512, max_position_embeddings=2048, rotary_pct=1.0,
                 use_parallel_residual=False, tie_word_embeddings=False, bos_token_id=2, eos_token_id=3)


@dataclass
class Plan:
    shape: dict
    parity_shape: dict
    dtype: str  # the "fp16" runs' dtype (float32 on the CPU)
    bw_bytes: int
    bw_iters: int
    prompt_len: int
    batches: tuple
    new_tokens: int
    hf_runs: tuple  # (batch, new tokens)
    repeats: int
    ttft_prompt: int
    ttft_repeats: int
    score_windows: int
    score_len: int
    compile_batches: tuple
    quant_schemes: tuple
    quant_compile: tuple  # schemes also timed with compile
    parity_tokens: int = 128
    compile_estimate_s: float = 75.0
    notes: list = field(default_factory=list)


def make_plan(cpu: bool, quick: bool) -> Plan:
    if cpu:
        return Plan(shape=SHAPE_CPU, parity_shape=SHAPE_CPU, dtype="float32", bw_bytes=64 << 20, bw_iters=5,
                    prompt_len=16, batches=(1, 4), new_tokens=24, hf_runs=((1, 12), (4, 12)), repeats=1,
                    ttft_prompt=512, ttft_repeats=3, score_windows=2, score_len=2048, compile_batches=(),
                    quant_schemes=("int8",), quant_compile=(), compile_estimate_s=0.0)
    return Plan(shape=SHAPE_36B, parity_shape=SHAPE_PARITY_GPU, dtype="float16", bw_bytes=1 << 30, bw_iters=20,
                prompt_len=32, batches=(1, 8, 32), new_tokens=64 if quick else 128,
                hf_runs=((1, 16), (32, 8)) if quick else ((1, 32), (8, 32), (32, 16)), repeats=2,
                ttft_prompt=512, ttft_repeats=5, score_windows=4, score_len=2048,
                compile_batches=(1,) if quick else (1, 32), quant_schemes=("int8", "int4"),
                quant_compile=("int8",) if quick else ("int8", "int4"))


# --- helpers ------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.cpu = args.cpu
        self.dev = torch.device("cpu" if args.cpu else "cuda")
        self.plan = make_plan(args.cpu, args.quick)
        self.t0 = time.perf_counter()
        self.budget = args.budget
        default_out = ROOT / "bench" / "results" / ("gpu-cpu.json" if args.cpu else "gpu.json")
        self.out = Path(args.output) if args.output else default_out
        self.result = {
            "mode": "cpu" if args.cpu else "cuda",
            "quick": bool(args.quick),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": self._versions(),
            "device": self._device_name(),
            "shape": self.plan.shape,
            "dtype": self.plan.dtype,
            "bandwidth_gbs": None,
            "parameters": None,
            "weight_bytes": None,
            "roofline_tokens_per_s": None,
            "peak_memory_bytes": None,
            "rows": [],
            "ttft_ms": {},
            "scoring": {},
            "parity": {},
            "targets": {},
            "sections": {},
            "elapsed_s": 0.0,
        }

    def _versions(self):
        import torch

        v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
        try:
            import transformers

            v["transformers"] = transformers.__version__
        except ImportError:
            v["transformers"] = None
        return v

    def _device_name(self):
        if self.cpu:
            return f"cpu ({os.cpu_count()} cores, {self.torch.get_num_threads()} threads)"
        return self.torch.cuda.get_device_name(self.dev)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return float("inf") if not self.budget else self.budget - self.elapsed()

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def free(self):
        gc.collect()
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()

    def save(self):
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.out)

    def section(self, name: str, fn, estimate_s: float = 0.0, skip: str | None = None):
        """Run one guarded section; record its status, time and peak memory."""
        rec = {"status": "ok"}
        if skip:
            rec = {"status": "skipped", "reason": skip}
        elif self.remaining() < estimate_s:
            rec = {"status": "skipped", "reason": f"time budget ({self.remaining():.0f} s left, needs ~{estimate_s:.0f} s)"}
        if rec["status"] == "skipped":
            print(f"-- {name}: skipped ({rec['reason']})", flush=True)
            self.result["sections"][name] = rec
            self.save()
            return None
        print(f"-- {name} ...", flush=True)
        if self.dev.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.dev)
        start = time.perf_counter()
        value = None
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - record and go on
            rec = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
            print(f"   ERROR {rec['error']}", flush=True)
        rec["seconds"] = round(time.perf_counter() - start, 2)
        if self.dev.type == "cuda":
            peak = self.torch.cuda.max_memory_allocated(self.dev)
            rec["peak_memory_bytes"] = peak
            self.result["peak_memory_bytes"] = max(self.result["peak_memory_bytes"] or 0, peak)
        self.result["sections"][name] = rec
        self.save()
        print(f"   {rec['status']} in {rec['seconds']} s", flush=True)
        return value

    def row(self, name, batch, ours, baseline=None, weight_bytes=None, **notes):
        bw, wb = self.result["bandwidth_gbs"], weight_bytes or self.result["weight_bytes"]
        roof = batch * bw * 1e9 / wb if (bw and wb and ours is not None) else None
        r = {
            "name": name, "batch": batch,
            "ours_tokens_per_s": _round(ours), "baseline_tokens_per_s": _round(baseline),
            "ratio": _round(ours / baseline, 2) if ours and baseline else None,
            "pct_roofline": _round(100 * ours / roof, 1) if roof else None,
            **notes,
        }
        self.result["rows"] = [x for x in self.result["rows"] if x["name"] != name] + [r]
        return r


def _round(x, nd=1):
    return None if x is None else round(float(x), nd)


def _greedy(penalty=1.0):
    from toolbox.runtime.sampling import SamplingParams

    return SamplingParams(temperature=0, repetition_penalty=penalty)


def random_hf(shape: dict, dtype, device, seed=0, init=0.02):
    """A transformers GPTNeoXForCausalLM with random weights, made on ``device`` in ``dtype``."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(**shape, initializer_range=init)
    with torch.device(device):
        hf = GPTNeoXForCausalLM._from_config(cfg, dtype=dtype)
    hf.eval().requires_grad_(False)
    if init != 0.02:  # make sure the init took (some versions initialise lazily)
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() >= 2:
                    p.normal_(0, init)
                else:
                    p.add_(torch.randn_like(p) * 0.1)
    hf.generation_config.pad_token_id = 0
    return hf


def ours_from_hf(hf, device):
    """Our GPTNeoX sharing the transformers model's weight tensors (no copy)."""
    import torch

    from toolbox.config import NeoXConfig
    from toolbox.runtime.model import GPTNeoX
    from toolbox.runtime.weights import hf_to_ours

    config = NeoXConfig.from_dict(hf.config.to_dict())
    with torch.device("meta"):
        m = GPTNeoX(config)
    state = {}
    for name, p in hf.named_parameters():
        ours = hf_to_ours(name)
        if ours is not None:
            state[ours] = p.detach()
    m.load_state_dict(state, strict=True, assign=True)
    m._init_rotary(torch.device(device))
    return m.eval().requires_grad_(False)


def clone_as(module, dtype):
    """A copy of our module with floating-point weights in ``dtype`` (for quantization)."""
    import torch

    from toolbox.runtime.model import GPTNeoX

    with torch.device("meta"):
        m = GPTNeoX(module.config)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in module.state_dict().items()}
    m.load_state_dict(state, strict=True, assign=True)
    m._init_rotary(module.device)
    return m.eval().requires_grad_(False)


def prompts_for(batch, length, vocab, seed=0, ragged=False):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        n = max(1, length - (7 * i) % max(length, 1)) if ragged else length
        out.append(torch.randint(4, vocab, (n,), generator=g).tolist())
    return out


def run_generation(b: Bench, module, prompts, n, decode_fn, sampling=None):
    """Time one forced-length generation; returns (seconds, first-token seconds, tokens by seq)."""
    from toolbox.runtime.generation import Generation

    g = Generation(module, prompts, max_new_tokens=n, min_new_tokens=n, sampling=sampling or _greedy(),
                   decode_fn=decode_fn)
    toks: dict[int, list[int]] = {}
    t0 = b.now()
    first = None
    for step in g:
        if first is None:
            first = time.perf_counter() - t0
        for t in step.tokens:
            toks.setdefault(t.seq, []).append(t.token_id)
    total = b.now() - t0
    return total, first, [toks[i] for i in range(len(toks))]


def decode_rate(b: Bench, module, prompts, n, decode_fn, repeats):
    """Decode tokens/s with prefill and the first token left out; warm-up first (captures/compiles)."""
    t_warm = run_generation(b, module, prompts, n, decode_fn)[0]
    t_n = min(run_generation(b, module, prompts, n, decode_fn)[0] for _ in range(repeats))
    t_1 = min(run_generation(b, module, prompts, 1, decode_fn)[0] for _ in range(repeats))
    B = len(prompts)
    rate = B * (n - 1) / (t_n - t_1) if t_n > t_1 else None
    return rate, {"warmup_s": round(t_warm, 2), "t_n_s": round(t_n, 4), "t_1_s": round(t_1, 4), "new_tokens": n}


def hf_rate(b: Bench, hf, batch, n, prompt_len, vocab, repeats):
    import torch

    ids = torch.tensor(prompts_for(batch, prompt_len, vocab), device=b.dev)
    mask = torch.ones_like(ids)

    def gen(k):
        t0 = b.now()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                        pad_token_id=0)
        return b.now() - t0

    gen(2)  # warm-up
    t_n = min(gen(n) for _ in range(repeats))
    t_1 = min(gen(1) for _ in range(repeats))
    return batch * (n - 1) / (t_n - t_1) if t_n > t_1 else None, {"t_n_s": round(t_n, 4), "t_1_s": round(t_1, 4),
                                                                   "new_tokens": n}


# --- sections -----------------------------------------------------------------


def measure_bandwidth(b: Bench):
    torch = b.torch
    n = b.plan.bw_bytes
    src = torch.empty(n, dtype=torch.uint8, device=b.dev)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(b.plan.bw_iters):
        t0 = b.now()
        dst.copy_(src)
        times.append(b.now() - t0)
    t = statistics.median(times)
    gbs = 2 * n / t / 1e9  # bytes read + written
    b.result["bandwidth_gbs"] = round(gbs, 1)
    b.result["bandwidth_method"] = ("device-to-device copy" if b.dev.type == "cuda" else "host memcpy") + \
        f" of {n >> 20} MiB, median of {b.plan.bw_iters}, read + write bytes"
    del src, dst
    b.free()


def build_models(b: Bench, state: dict):
    from toolbox.runtime.loaded import weight_bytes

    torch = b.torch
    dtype = getattr(torch, b.plan.dtype)
    t0 = b.now()
    hf = random_hf(b.plan.shape, dtype, b.dev)
    ours = ours_from_hf(hf, b.dev)
    state.update(hf=hf, ours=ours)
    b.result["build_s"] = round(b.now() - t0, 2)
    b.result["parameters"] = sum(p.numel() for p in ours.parameters())
    b.result["weight_bytes"] = weight_bytes(ours)
    if b.result["bandwidth_gbs"]:
        b.result["roofline_tokens_per_s"] = round(b.result["bandwidth_gbs"] * 1e9 / b.result["weight_bytes"], 1)


def baseline_generate(b: Bench, state: dict):
    hf, vocab = state["hf"], b.plan.shape["vocab_size"]
    out = {}
    for batch, n in b.plan.hf_runs:
        rate, info = hf_rate(b, hf, batch, n, b.plan.prompt_len, vocab, b.plan.repeats)
        out[batch] = rate
        b.result.setdefault("baseline", {})[f"b{batch}"] = {"tokens_per_s": _round(rate), **info}
        print(f"   transformers eager generate b{batch}: {_round(rate)} tokens/s", flush=True)
    state["baseline"] = out


def ours_fp16(b: Bench, state: dict, compile: bool, batches):
    from toolbox.runtime.graphs import GraphedDecoder

    ours, vocab = state["ours"], b.plan.shape["vocab_size"]
    label = "graphs" if b.dev.type == "cuda" else "eager stand-in"
    if compile:
        label += "+compile"
    dec = GraphedDecoder(ours, compile=compile)
    short = "fp16" if b.plan.dtype == "float16" else "fp32"
    for batch in batches:
        prompts = prompts_for(batch, b.plan.prompt_len, vocab)
        rate, info = decode_rate(b, ours, prompts, b.plan.new_tokens, dec, b.plan.repeats)
        r = b.row(f"ours {short} {label} b{batch}", batch, rate, state.get("baseline", {}).get(batch),
                  captures=dec.captures, compiled=dec.compiled, compile_error=dec.compile_error,
                  capture_error=dec.capture_error, **info)
        state.setdefault("fp16", {})[(batch, compile)] = rate
        print(f"   {r['name']}: {r['ours_tokens_per_s']} tokens/s ({r['pct_roofline']} % of roofline)", flush=True)
        if batch == 1 and not compile:
            replay_only(b, state, dec, prompts, short, label)
    ours.drop_cache()
    del dec
    b.free()


def replay_only(b: Bench, state, dec, prompts, short, label):
    """The decode step alone, back to back (no sampling, no host round trip per token)."""
    torch = b.torch
    ours = state["ours"]
    n = b.plan.new_tokens
    S = ours.cache_shape[1]
    ids = torch.tensor([[p[-1]] for p in prompts], device=b.dev)
    pos = torch.full((len(prompts), 1), b.plan.prompt_len, device=b.dev)
    mask = torch.ones(len(prompts), S, dtype=torch.bool, device=b.dev)
    slot = torch.tensor([b.plan.prompt_len], device=b.dev)
    kv = b.plan.prompt_len + 1
    dec(ids, pos, slot, mask, kv)
    t0 = b.now()
    for _ in range(n):
        dec(ids, pos, slot, mask, kv)
    t = b.now() - t0
    b.row(f"ours {short} {label} b1 (step replay only)", 1, n / t, state.get("baseline", {}).get(1))


def ttft(b: Bench, state: dict):
    import torch

    ours, hf, vocab = state["ours"], state["hf"], b.plan.shape["vocab_size"]
    prompt = prompts_for(1, b.plan.ttft_prompt, vocab, seed=3)
    run_generation(b, ours, prompt, 1, None)  # warm-up
    mine = [run_generation(b, ours, prompt, 1, None)[1] for _ in range(b.plan.ttft_repeats)]
    ids = torch.tensor(prompt, device=b.dev)

    def hf_first():
        t0 = b.now()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                        pad_token_id=0)
        return b.now() - t0

    hf_first()
    theirs = [hf_first() for _ in range(b.plan.ttft_repeats)]
    ours.drop_cache()
    b.result["ttft_ms"] = {"prompt_tokens": b.plan.ttft_prompt, "ours": round(1000 * statistics.median(mine), 2),
                           "baseline": round(1000 * statistics.median(theirs), 2)}
    print(f"   TTFT {b.plan.ttft_prompt} tokens: ours {b.result['ttft_ms']['ours']} ms, "
          f"transformers {b.result['ttft_ms']['baseline']} ms", flush=True)


def scoring(b: Bench, state: dict):
    import torch

    from toolbox.runtime.generation import score

    ours, hf, vocab = state["ours"], state["hf"], b.plan.shape["vocab_size"]
    W, T = b.plan.score_windows, b.plan.score_len
    windows = prompts_for(W, T, vocab, seed=5)
    score(ours, windows[:1])  # warm-up
    t0 = b.now()
    score(ours, windows)
    mine = W * T / (b.now() - t0)
    ids = torch.tensor(windows, device=b.dev)
    per = max(1, 4096 // T)  # the same batches as score()'s default max_batch_tokens

    def hf_pass():
        with torch.inference_mode():
            for i in range(0, W, per):
                chunk = ids[i : i + per]
                hf(input_ids=chunk, labels=chunk).loss.item()

    hf_pass()
    t0 = b.now()
    hf_pass()
    theirs = W * T / (b.now() - t0)
    b.result["scoring"] = {"windows": W, "window_tokens": T, "ours_tokens_per_s": round(mine),
                           "baseline_tokens_per_s": round(theirs), "ratio": round(mine / theirs, 2)}
    print(f"   scoring {W}x{T}: ours {round(mine)} tokens/s, transformers forward+loss {round(theirs)}", flush=True)


def quant(b: Bench, state: dict, scheme: str, compile: bool):
    import toolbox.runtime.quant as toolbox_quant
    from toolbox.runtime.graphs import GraphedDecoder
    from toolbox.runtime.loaded import weight_bytes

    torch = b.torch
    ours, vocab = state["ours"], b.plan.shape["vocab_size"]
    key = ("qmodule", scheme)
    qm = state.get(key)
    if qm is None:
        for k in [k for k in state if isinstance(k, tuple) and k[0] == "qmodule"]:
            del state[k]  # one quantized model at a time
        b.free()
        t0 = b.now()
        if b.dev.type == "cpu":
            qm = toolbox_quant.quantize_cpu_int8(clone_as(ours, torch.float32))
        else:
            qm = toolbox_quant.quantize_cuda(clone_as(ours, torch.bfloat16), scheme)
        b.result.setdefault("quantize_s", {})[scheme] = round(b.now() - t0, 2)
        state[key] = qm
    prompts = prompts_for(1, b.plan.prompt_len, vocab)
    if b.dev.type == "cpu":
        dec, label = None, "plain"  # the CPU quant backend decodes on the plain path
    else:
        dec, label = GraphedDecoder(qm, compile=compile), ("graphs+compile" if compile else "graphs")
    rate, info = decode_rate(b, qm, prompts, b.plan.new_tokens, dec, b.plan.repeats)
    wb = weight_bytes(qm)
    fp16 = state.get("fp16", {})
    best16 = max((v for (bb, _), v in fp16.items() if bb == 1 and v), default=None)
    r = b.row(f"quant {scheme} {label} b1", 1, rate, state.get("baseline", {}).get(1), weight_bytes=wb,
              weight_bytes_quantized=wb, vs_ours_fp16_b1=_round(rate / best16, 2) if rate and best16 else None,
              compiled=getattr(dec, "compiled", False), compile_error=getattr(dec, "compile_error", None),
              capture_error=getattr(dec, "capture_error", None), **info)
    state.setdefault("quant", {})[(scheme, compile)] = rate
    print(f"   {r['name']}: {r['ours_tokens_per_s']} tokens/s, x{r['vs_ours_fp16_b1']} our fp16 b1", flush=True)
    qm.drop_cache()
    del dec
    b.free()


def parity(b: Bench, state: dict, compile: bool = False):
    """Fast path vs plain eager path: fp32 greedy tokens, fp16 logits."""
    import torch

    from toolbox.runtime.graphs import GraphedDecoder

    shape, n = b.plan.parity_shape, b.plan.parity_tokens
    out = b.result["parity"]
    hf32 = random_hf(shape, torch.float32, b.dev, seed=1, init=0.05)
    m32 = ours_from_hf(hf32, b.dev)
    vocab = shape["vocab_size"]
    cases = {"b1": prompts_for(1, 9, vocab, seed=7), "ragged_b3": prompts_for(3, 17, vocab, seed=8, ragged=True)}
    tag = "compile" if compile else "fast"
    for penalty in (1.0, 1.3):
        for name, prompts in cases.items():
            ref = run_generation(b, m32, prompts, n, None, _greedy(penalty))[2]
            dec = GraphedDecoder(m32, compile=compile)
            got = run_generation(b, m32, prompts, n, dec, _greedy(penalty))[2]
            out[f"fp32_tokens_{tag}_{name}_penalty{penalty}"] = {
                "identical": got == ref, "tokens": n, "distinct_tokens": len(set(ref[0])),
                "first_difference": _first_diff(got, ref), "compiled": dec.compiled,
                "compile_error": dec.compile_error, "capture_error": dec.capture_error, "captures": dec.captures,
            }
            m32.drop_cache()
    if compile:
        return
    # fp16 (bf16 on the CPU would be slow to no purpose: fp32 there) logits of both paths vs fp32
    low = torch.float16 if b.dev.type == "cuda" else torch.bfloat16
    m16 = clone_as(m32, low)
    prompts = cases["ragged_b3"]
    ref32 = _decode_logits(b, m32, prompts, None, 32)
    eager16 = _decode_logits(b, m16, prompts, None, 32)
    fast16 = _decode_logits(b, m16, prompts, GraphedDecoder(m16), 32)
    k = _agreeing_steps(eager16, fast16)  # the two low-precision paths, as long as they agree
    k32 = _agreeing_steps(ref32, eager16, fast16)  # and against fp32 (low precision drifts off sooner)

    def rel(a, b, n):
        a, b = torch.stack(a[:n]).float(), torch.stack(b[:n]).float()
        return (a - b).abs().max().item() / b.abs().max().item()

    out[f"{str(low).removeprefix('torch.')}_logits"] = {
        "steps_compared": k,
        "fast_vs_eager_rel": rel(fast16, eager16, k),
        "steps_compared_with_fp32": k32,
        "eager_vs_fp32_rel": rel(eager16, ref32, k32),
        "fast_vs_fp32_rel": rel(fast16, ref32, k32),
    }
    del m16, m32, hf32
    b.free()


def _agreeing_steps(*runs) -> int:
    """Decode steps whose inputs were the same in every run: up to and including the first
    step where some run's greedy choice (the argmax) differs."""
    k = min(len(r) for r in runs)
    for i in range(k):
        choices = [r[i].argmax(-1) for r in runs]
        if any(not bool((c == choices[0]).all()) for c in choices[1:]):
            return i + 1
    return k


def _first_diff(got, ref):
    for i, (g, r) in enumerate(zip(got, ref)):
        for j, (x, y) in enumerate(zip(g, r)):
            if x != y:
                return [i, j]
    return None


def _decode_logits(b: Bench, module, prompts, decoder, n):
    """Logits of the first n decode steps (tokens are the path's own greedy choices)."""
    from toolbox.runtime.generation import Generation

    logs = []
    inner = decoder or (lambda ids, pos, slot, mask, kv_len: module(ids, pos, slot, mask, kv_len=kv_len))

    def record(*args):
        y = inner(*args)
        logs.append(y[:, -1].detach().float().cpu())
        return y

    g = Generation(module, prompts, max_new_tokens=n + 1, min_new_tokens=n + 1, sampling=_greedy(), decode_fn=record)
    for _ in g:
        pass
    module.drop_cache()
    return logs


def quant_cache_roundtrip(b: Bench, state: dict):
    """Quantize the parity-size model, save it in the quant backend's cache format, reload, compare."""
    import torch

    import toolbox.runtime.quant as toolbox_quant

    shape = b.plan.parity_shape
    hf = random_hf(shape, torch.float32 if b.dev.type == "cpu" else torch.bfloat16, b.dev, seed=2, init=0.05)
    base = ours_from_hf(hf, b.dev)
    ids = torch.tensor(prompts_for(1, 12, shape["vocab_size"], seed=9), device=b.dev)
    pos = torch.arange(ids.shape[1], device=b.dev)[None]
    with torch.inference_mode():
        ref = base.forward_full(ids)
    res = b.result["parity"].setdefault("quant_cache", {})
    schemes = ("int8",) if b.dev.type == "cpu" else ("int8", "int4")
    with tempfile.TemporaryDirectory() as tmp:
        hf.config.save_pretrained(tmp)
        for scheme in schemes:
            q = clone_as(base, base.dtype)
            t0 = b.now()
            q = toolbox_quant.quantize_cpu_int8(q) if b.dev.type == "cpu" else toolbox_quant.quantize_cuda(q, scheme)
            tq = b.now() - t0
            d = Path(tmp) / f"q-{scheme}"
            t0 = b.now()
            toolbox_quant.save_quantized(q, d, scheme, Path(tmp))
            ts = b.now() - t0
            t0 = b.now()
            q2 = toolbox_quant.load_quantized(d, Path(tmp), str(b.dev))
            tl = b.now() - t0
            with torch.inference_mode():
                a, c = q(ids, pos, pos[0], None), q2(ids, pos, pos[0], None)
            res[scheme] = {
                "identical_logits": bool(torch.equal(a, c)),
                "rel_err_vs_unquantized": (a - ref).abs().max().item() / ref.abs().max().item(),
                "quantize_s": round(tq, 3), "save_s": round(ts, 3), "load_s": round(tl, 3),
                "bytes_on_disk": sum(f.stat().st_size for f in d.iterdir()),
            }
            del q, q2
    del hf, base
    b.free()


def targets(b: Bench, state: dict):
    fp16 = state.get("fp16", {})
    q = state.get("quant", {})
    b1 = max((v for (bb, _), v in fp16.items() if bb == 1 and v), default=None)
    b32 = max((v for (bb, _), v in fp16.items() if bb == 32 and v), default=None)
    roof = b.result["roofline_tokens_per_s"]
    i8 = max((v for (s, _), v in q.items() if s == "int8" and v), default=None)
    i4 = max((v for (s, _), v in q.items() if s == "int4" and v), default=None)
    par = b.result["parity"]
    fp32_ok = [v["identical"] for k, v in par.items() if k.startswith("fp32_tokens_fast")]
    logits = next((v for k, v in par.items() if k.endswith("_logits")), None)

    def t(target, value, met):
        return {"target": target, "value": value, "met": met}

    b.result["targets"] = {
        "fp16_b1_pct_roofline": t(">= 75", _round(100 * b1 / roof, 1) if b1 and roof else None,
                                  bool(b1 and roof and b1 / roof >= 0.75)),
        "fp16_b32_tokens_per_s": t(">= 8000 (H200)", _round(b32), bool(b32 and b32 >= 8000)),
        "int8_vs_fp16_b1": t(">= 1.6", _round(i8 / b1, 2) if i8 and b1 else None, bool(i8 and b1 and i8 / b1 >= 1.6)),
        "int4_vs_fp16_b1": t(">= 2.2", _round(i4 / b1, 2) if i4 and b1 else None, bool(i4 and b1 and i4 / b1 >= 2.2)),
        "ttft_512_ms": t("<= 20", b.result["ttft_ms"].get("ours"),
                         bool(b.result["ttft_ms"].get("ours") and b.result["ttft_ms"]["ours"] <= 20)),
        "fp32_greedy_identical_128": t("all identical", all(fp32_ok) if fp32_ok else None,
                                       bool(fp32_ok and all(fp32_ok))),
        "low_precision_logits_rel": t("<= 1e-2", logits and logits["fast_vs_eager_rel"],
                                      bool(logits and logits["fast_vs_eager_rel"] <= 1e-2)),
    }
    if b.dev.type == "cpu":
        b.result["targets_note"] = "CPU mode: a smoke test of every code path; the targets apply to the GPU run"


def print_table(b: Bench):
    r = b.result
    print()
    print(f"device: {r['device']}   bandwidth {r['bandwidth_gbs']} GB/s   weights {r['weight_bytes']} bytes   "
          f"roofline b1 {r['roofline_tokens_per_s']} tokens/s   peak memory {r['peak_memory_bytes']}")
    head = f"{'':48s} {'batch':>5s} {'ours tok/s':>11s} {'baseline':>10s} {'ratio':>7s} {'% roofline':>10s}"
    print(head)
    print("-" * len(head))

    def f(x):
        return "-" if x is None else f"{x:,.1f}" if isinstance(x, float) else str(x)

    for row in r["rows"]:
        print(f"{row['name']:48s} {row['batch']:>5d} {f(row['ours_tokens_per_s']):>11s} "
              f"{f(row['baseline_tokens_per_s']):>10s} {f(row['ratio']):>7s} {f(row['pct_roofline']):>10s}")
    t = r["ttft_ms"]
    if t:
        print(f"{'TTFT ' + str(t['prompt_tokens']) + ' tokens (ms)':48s} {1:>5d} {f(t['ours']):>11s} {f(t['baseline']):>10s}")
    s = r["scoring"]
    if s:
        print(f"{'scoring ' + str(s['windows']) + 'x' + str(s['window_tokens']) + ' tokens (tok/s)':48s} "
              f"{s['windows']:>5d} {f(float(s['ours_tokens_per_s'])):>11s} {f(float(s['baseline_tokens_per_s'])):>10s} "
              f"{f(s['ratio']):>7s}")
    print()
    for name, v in r["targets"].items():
        print(f"target {name:32s} {v['target']:>16s}  value {v['value']}  {'MET' if v['met'] else 'not met'}")
    bad = {k: v for k, v in r["sections"].items() if v["status"] != "ok"}
    for k, v in bad.items():
        print(f"section {k}: {v['status']} ({v.get('reason') or v.get('error')})")
    print(f"\nwrote {b.out}  ({r['elapsed_s']} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="small shape on the CPU (the CI smoke test)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and compile runs")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile section")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of work before optional sections are skipped (default 330 on CUDA, none on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (--cpu; 1: a busy 2-core CI machine stalls on more)")
    parser.add_argument("--output", help="JSON path (default bench/results/gpu.json or gpu-cpu.json)")
    args = parser.parse_args(argv)

    import torch

    if args.cpu:
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; use --cpu for the small CPU run", file=sys.stderr)
        return 2
    if args.budget is None:
        args.budget = 0 if args.cpu else 330
    b = Bench(args)
    p = b.plan
    state: dict = {}
    print(f"bench/gpu.py: {b.result['mode']} on {b.result['device']}, torch {torch.__version__}", flush=True)

    b.section("bandwidth", lambda: measure_bandwidth(b))
    b.section("build", lambda: build_models(b, state))
    if "ours" not in state:
        b.save()
        print_table(b)
        return 1
    b.section("baseline_generate", lambda: baseline_generate(b, state), estimate_s=10)
    b.section("ours_fp16", lambda: ours_fp16(b, state, False, p.batches), estimate_s=10)
    b.section("ttft", lambda: ttft(b, state), estimate_s=3)
    b.section("scoring", lambda: scoring(b, state), estimate_s=3)
    b.section("parity", lambda: parity(b, state), estimate_s=10)
    for scheme in p.quant_schemes:
        b.section(f"quant_{scheme}", lambda s=scheme: quant(b, state, s, False), estimate_s=15)
    b.section("quant_cache_roundtrip", lambda: quant_cache_roundtrip(b, state), estimate_s=10)
    no_compile = "needs CUDA (Inductor + graph capture)" if args.cpu else ("--no-compile" if args.no_compile else None)
    est = p.compile_estimate_s
    if 1 in p.compile_batches or args.cpu:
        b.section("ours_fp16_compile_b1", lambda: ours_fp16(b, state, True, (1,)), estimate_s=est, skip=no_compile)
    for scheme in p.quant_compile or (("int8",) if args.cpu else ()):
        b.section(f"quant_{scheme}_compile", lambda s=scheme: quant(b, state, s, True), estimate_s=est, skip=no_compile)
    for batch in p.compile_batches:
        if batch != 1:
            b.section(f"ours_fp16_compile_b{batch}", lambda bb=batch: ours_fp16(b, state, True, (bb,)), estimate_s=est,
                      skip=no_compile)
    if not args.quick:
        b.section("parity_compile", lambda: parity(b, state, compile=True), estimate_s=est, skip=no_compile)
    for k in [k for k in state if isinstance(k, tuple)]:
        del state[k]
    targets(b, state)
    if b.dev.type == "cuda":
        b.result["peak_memory_bytes"] = max(b.result["peak_memory_bytes"] or 0, torch.cuda.max_memory_allocated(b.dev))
    b.save()
    print_table(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
