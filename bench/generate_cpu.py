"""CPU generation benchmark: our backends against transformers' `generate`, side by side.

Every configuration runs in its own child process (so peak RSS is its own) with the
same thread count, batch 1, greedy, a fixed number of new tokens (EOS held off).
Decode tokens/s is decode alone: the time for N new tokens less the time for the
first (the prompt's prefill and one sample), best of --runs each; --prompt-tokens sets
the prompt it decodes after (capped to fit the model's context):

- the embedded model: `cpu` fp32, eager and compiled (`-o compile=1`; the load time
  includes compiling), vs transformers fp32 (decode tokens/s);
- shape S (hidden 1024, 8 layers, 16 heads, intermediate 4096, vocab 32000, the shape
  llama.cpp's figures in ../shared/tools/README.md are for), random weights: `cpu`
  fp32/bf16 (bf16 also compiled) and `quant` int8/int4 vs transformers fp32/bf16/int8
  (`quantize_dynamic`): decode tokens/s, prompt processing (512 tokens) tokens/s and
  peak RSS. `quant` runs twice per scheme: the first load quantizes the fp16 checkpoint
  and writes the quantized-weight cache (a fresh one in a temporary directory), the
  second loads from that cache, as every later run does.

llama.cpp side by side, on the same weights: bench/llamacpp.py (it uses this script's
child mode for the toolbox's side).

    python bench/generate_cpu.py [--threads 2] [--runs 3] [--new-tokens 64] [--prompt-tokens 16] [--quick]

Writes bench/results/generate_cpu[_embedded][_promptN].json (_embedded with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "toolbox" / "data" / "embedded"
SHAPE_S = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, intermediate_size=4096,
               vocab_size=32000)
# the 3.6B's layers (hidden 2816, 22 heads of 128, intermediate 11264, vocab 32000), 4 of its 36:
# each product is one the real model runs, with a ninth of its layers (a ninth of its time a token)
SHAPE_L = dict(hidden_size=2816, num_hidden_layers=4, num_attention_heads=22, intermediate_size=11264,
               vocab_size=32000)
SHAPE_3B6 = dict(SHAPE_L, num_hidden_layers=36)  # the series' own shape, all 36 layers
COMPILED = {"compile": "1"}
CONFIGS = [
    # (name, model, engine, dtype, backend options)
    ("embedded ours fp32", "embedded", "cpu", "float32", {}),
    ("embedded ours fp32, compiled", "embedded", "cpu", "float32", COMPILED),
    ("embedded transformers fp32", "embedded", "hf", "float32", {}),
    ("S ours fp32", "S", "cpu", "float32", {}),
    ("S transformers fp32", "S", "hf", "float32", {}),
    ("S ours bf16", "S", "cpu", "bfloat16", {}),
    ("S ours bf16, compiled", "S", "cpu", "bfloat16", COMPILED),
    ("S transformers bf16", "S", "hf", "bfloat16", {}),
    ("S ours int8 (quant), first load", "S", "quant", "int8", {}),  # quantizes, writes the cache
    ("S ours int8 (quant)", "S", "quant", "int8", {}),  # from the quantized-weight cache, as every later run
    ("S ours int8 (quant), compiled", "S", "quant", "int8", COMPILED),
    ("S transformers int8 (quantize_dynamic)", "S", "hf", "int8", {}),
    ("S ours int4 (quant), first load", "S", "quant", "int4", {}),
    ("S ours int4 (quant)", "S", "quant", "int4", {}),
    ("S ours int4 (quant), compiled", "S", "quant", "int4", COMPILED),
]


def build_shape_s(path: Path, shape: dict = SHAPE_S) -> None:
    """A random GPT-NeoX in `shape` (S by default), saved in the Hugging Face layout with the embedded tokenizer."""
    import shutil

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(**shape, max_position_embeddings=2048, rotary_pct=1.0, tie_word_embeddings=False,
                           bos_token_id=2, eos_token_id=3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # made in fp16: no float32 copy (14 GB for the 3.6B)
    try:
        model = GPTNeoXForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)  # stored in fp16, like the series' checkpoints
    shutil.copy(EMBEDDED / "spiece.model", path / "spiece.model")


def child(args) -> dict:
    """Measure one configuration in this process."""
    import torch

    torch.set_num_threads(args.threads)
    context = json.loads((Path(args.model_dir) / "config.json").read_text())["max_position_embeddings"]
    # the decode runs' prompt, capped to fit the context with the new tokens
    prompt = [100 + (i * 37) % 7000 for i in range(min(args.prompt_tokens, context - args.new_tokens))]
    long_prompt = [100 + (i * 37) % 7000 for i in range(min(512, context - 1))]
    start = time.perf_counter()
    if args.engine == "hf":
        generate, prefill = _hf(args)
    else:
        generate, prefill = _ours(args)
    load_s = time.perf_counter() - start
    generate(prompt, args.new_tokens)  # warm up
    prefill(long_prompt)
    # decode alone: N tokens less the first (the prompt's prefill and one sample), best runs
    t_all = min(_timed(generate, prompt, args.new_tokens) for _ in range(args.runs))
    t_first = min(_timed(generate, prompt, 1) for _ in range(args.runs))
    tg = (args.new_tokens - 1) / (t_all - t_first)
    pp = max(len(long_prompt) / _timed(prefill, long_prompt) for _ in range(args.runs))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
    status = Path("/proc/self/status").read_text()
    peak_mb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    return {"decode_tokens_per_s": round(tg, 1), "prompt_tokens_per_s": round(pp, 1), "peak_rss_mb": round(peak_mb, 1),
            "load_s": round(load_s, 1), "decode_prompt_tokens": len(prompt)}


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _ours(args):
    from toolbox.backend import GenerationParams, LoadOptions
    from toolbox.backends import pick as pick_backend

    options = LoadOptions(dtype=args.dtype, threads=args.threads, extra=json.loads(args.options))
    model = pick_backend(args.engine).load(Path(args.model_dir), options)
    def generate(prompt, n):
        for _ in model.generate_tokens([prompt], GenerationParams(max_new_tokens=n, min_new_tokens=n, temperature=0.0)):
            pass

    return generate, lambda prompt: generate(prompt, 1)


def _hf(args):
    import warnings

    import torch
    from transformers import GPTNeoXForCausalLM

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = GPTNeoXForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    if args.dtype == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def generate(prompt, n):
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    def prefill(prompt):
        with torch.inference_mode():
            model(torch.tensor([prompt]))

    return generate, prefill


def child_command(model_dir, engine, dtype, options: dict, threads: int, runs: int, new_tokens: int,
                  prompt_tokens: int) -> list[str]:
    """The command line measuring one configuration in a child process (its last stdout line is JSON)."""
    return [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--engine", engine, "--dtype", dtype,
            "--options", json.dumps(options), "--threads", str(threads), "--runs", str(runs),
            "--new-tokens", str(new_tokens), "--prompt-tokens", str(prompt_tokens)]


def run_config(name, model_dir, engine, dtype, options, args, cache_dir: Path) -> dict:
    cmd = child_command(model_dir, engine, dtype, options, args.threads, args.runs, args.new_tokens,
                        args.prompt_tokens)
    env = {**os.environ, "TOOLBOX_CACHE": str(cache_dir)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{name:42s} decode {result['decode_tokens_per_s']:8.1f} tok/s   prompt {result['prompt_tokens_per_s']:8.1f} tok/s"
          f"   peak RSS {result['peak_rss_mb']} MB   load {result['load_s']} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16,
                        help="prompt length of the decode runs (decode tokens/s includes that prompt's prefill)")
    parser.add_argument("--quick", action="store_true", help="embedded model only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shape_s = Path(tmp) / "shape-s"
        configs = [c for c in CONFIGS if c[1] == "embedded" or not args.quick]
        if not args.quick:
            build_shape_s(shape_s)
        for name, model, engine, dtype, options in configs:
            model_dir = EMBEDDED if model == "embedded" else shape_s
            results[name] = run_config(name, model_dir, engine, dtype, options, args, Path(tmp) / "cache")

    def ratio(a, b, key="decode_tokens_per_s"):
        return round(results[a][key] / results[b][key], 2) if a in results and b in results else None

    summary = {
        "embedded decode, ours / transformers": ratio("embedded ours fp32", "embedded transformers fp32"),
        "embedded decode compiled, ours / transformers": ratio("embedded ours fp32, compiled", "embedded transformers fp32"),
        "S fp32 decode, ours / transformers": ratio("S ours fp32", "S transformers fp32"),
        "S bf16 decode, ours / transformers": ratio("S ours bf16", "S transformers bf16"),
        "S bf16 decode compiled, ours / transformers": ratio("S ours bf16, compiled", "S transformers bf16"),
        "S int8 decode, ours / transformers": ratio("S ours int8 (quant)", "S transformers int8 (quantize_dynamic)"),
        "S int8 decode compiled, ours / transformers": ratio("S ours int8 (quant), compiled",
                                                             "S transformers int8 (quantize_dynamic)"),
        "S bf16 prompt, ours / transformers": ratio("S ours bf16", "S transformers bf16", "prompt_tokens_per_s"),
        "S int8 peak RSS / fp32 peak RSS": ratio("S ours int8 (quant)", "S ours fp32", "peak_rss_mb"),
        "S int8 first load (quantizing) peak RSS / fp32": ratio("S ours int8 (quant), first load", "S ours fp32",
                                                                 "peak_rss_mb"),
        "S int4 peak RSS / fp32 peak RSS": ratio("S ours int4 (quant)", "S ours fp32", "peak_rss_mb"),
        "S int4 first load (quantizing) peak RSS / fp32": ratio("S ours int4 (quant), first load", "S ours fp32",
                                                                 "peak_rss_mb"),
    }
    for key, value in summary.items():
        print(f"{key:45s} {value}")
    name = "generate_cpu" + ("_embedded" if args.quick else "") + (
        f"_prompt{args.prompt_tokens}" if args.prompt_tokens != 16 else "")
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "runs": args.runs, "results": results,
        "ratios": summary,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
