"""Decode side by side with llama.cpp: the same weights, the same machine, interleaved runs.

Each row pairs a toolbox configuration with the llama.cpp GGUF type of the same
precision, on the same checkpoint (the embedded model; shape S: hidden 1024, 8 layers,
16 heads, vocab 32000; shape L: four layers of the 3.6B's shape, hidden 2816, 22 heads,
intermediate 11264; random weights, built by bench/generate_cpu.py):

  embedded fp32 / f32, int8 / q8_0, int4 / q4_0;  S fp32 / f32, bf16 / bf16, int8 / q8_0,
  int4 / q4_0;  L bf16 / bf16, int8 / q8_0, int4 / q4_0;  3.6B (the series' own shape,
  random weights, 7 GB in fp16) the same   (toolbox eager, and compiled with --compiled;
  L and 3.6B are not in the default rows: --rows L-bf16,L-int8,L-int4)

For every repeat, every row runs the toolbox (a child process of bench/generate_cpu.py:
decode tokens/s after a --prompt-tokens prompt, best of --runs) and then llama.cpp's
`llama-bench -n N -p 0 [-d DEPTH]` (decode after DEPTH tokens of context, best of --runs),
so the two meet the machine in the same state; the ratio of each pair is recorded and
the summary gives the range over repeats. `--depths 16,256,1000,2000` gives the long-context
curve (toolbox prompt = llama.cpp depth), `--prompt 512` adds prompt processing.

llama.cpp: `$LLAMA_CPP_DIR` or ../llama next to this repository (bin/llama-bench,
bin/llama-quantize); the GGUF files are made with `$LLAMA_CPP_CONVERTER` or
../shared/tools/convert-gptneox-gguf.py (q4_0 by quantizing the f16 file). Without
them the script says so and exits with status 2. On Intel CPUs with AMX, llama.cpp's
repacked q8_0/q4_0 kernels crash on anything but single-token decode, so prompt
processing runs with `--repack 0` there, and so does decoding after more than 16 tokens
of context; decoding after 16 tokens or fewer runs from an empty context with the
repacked kernels (their fastest decode; recorded in the results).

    python bench/llamacpp.py [--threads 2] [--repeats 3] [--runs 3] [--new-tokens 128]
        [--rows S-int4,S-int8] [--depths 16,1000] [--prompt 512] [--compiled] [--work DIR]

Writes bench/results/llamacpp[_SUFFIX].json (--suffix) with the machine, load averages,
the commands, every sample and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from generate_cpu import EMBEDDED, SHAPE_3B6, SHAPE_L, build_shape_s, child_command  # noqa: E402

# precision -> (toolbox backend, dtype, GGUF type)
PRECISIONS = {
    "fp32": ("cpu", "float32", "f32"),
    "bf16": ("cpu", "bfloat16", "bf16"),
    "int8": ("quant", "int8", "q8_0"),
    "int4": ("quant", "int4", "q4_0"),
}
# name -> (model, toolbox backend, dtype, GGUF type)
ROWS = {f"{model}-{precision}": (model, *PRECISIONS[precision])
        for model, precisions in (("embedded", ("fp32", "int8", "int4")), ("S", ("fp32", "bf16", "int8", "int4")),
                                  ("L", ("bf16", "int8", "int4")), ("3.6B", ("bf16", "int8", "int4")))
        for precision in precisions}


def llama_dir() -> Path | None:
    found = Path(os.environ.get("LLAMA_CPP_DIR") or ROOT.parent / "llama")
    return found if (found / "bin" / "llama-bench").is_file() else None


def converter() -> Path | None:
    found = Path(os.environ.get("LLAMA_CPP_CONVERTER") or ROOT.parent / "shared" / "tools" / "convert-gptneox-gguf.py")
    return found if found.is_file() else None


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def has_amx() -> bool:
    return " amx_tile" in Path("/proc/cpuinfo").read_text()


def gguf(llama: Path, model_dir: Path, kind: str, work: Path) -> Path:
    """The GGUF file of `model_dir` in `kind` (made once per work directory)."""
    out = work / f"{model_dir.name}-{kind}.gguf"
    if out.is_file():
        return out
    if kind == "q4_0":
        f16 = gguf(llama, model_dir, "f16", work)
        subprocess.run([str(llama / "bin" / "llama-quantize"), str(f16), str(out), "q4_0"], check=True,
                       capture_output=True)
    else:
        subprocess.run([sys.executable, str(converter()), str(llama), str(model_dir), str(out), "--outtype", kind],
                       check=True, capture_output=True)
    return out


def run_waited(cmd: list[str], env=None) -> tuple[str, float]:
    """Run `cmd`; its stdout and its own peak RSS in MB (from wait4)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exited with {proc.returncode}")
    return text, usage.ru_maxrss / 1024


def llama_bench(llama: Path, model: Path, threads: int, runs: int, new_tokens: int, depth: int, prompt: int,
                repack: bool) -> dict:
    cmd = [str(llama / "bin" / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", str(runs), "-o", "json"]
    cmd += ["-p", str(prompt), "-n", "0"] if prompt else ["-p", "0", "-n", str(new_tokens), "-d", str(depth)]
    if not repack:
        cmd += ["--repack", "0"]
    text, peak = run_waited(cmd)
    result = json.loads(text)[0]
    return {"tokens_per_s": round(max(result["samples_ts"]), 1), "mean_tokens_per_s": round(result["avg_ts"], 1),
            "peak_rss_mb": round(peak, 1), "command": " ".join(cmd)}


def llama_decode(llama: Path, model: Path, kind: str, args, depth: int) -> dict:
    """llama.cpp's decode after ``depth`` tokens of context. With AMX, its repacked q8_0/q4_0
    kernels crash once a prompt has been processed: there a short context (16 tokens or
    fewer) is measured from an empty one with those kernels (their fastest decode, with a
    few tokens less to attend to), a longer one with ``--repack 0``."""
    if depth and kind in ("q8_0", "q4_0") and has_amx():
        if depth <= 16:
            return {**llama_bench(llama, model, args.threads, args.runs, args.new_tokens, 0, 0, True), "depth": 0}
        return llama_bench(llama, model, args.threads, args.runs, args.new_tokens, depth, 0, False)
    return llama_bench(llama, model, args.threads, args.runs, args.new_tokens, depth, 0, True)


def toolbox_bench(model_dir: Path, engine: str, dtype: str, options: dict, args, prompt_tokens: int,
                  cache: Path) -> dict:
    cmd = child_command(model_dir, engine, dtype, options, args.threads, args.runs, args.new_tokens, prompt_tokens)
    text, _ = run_waited(cmd, env={**os.environ, "TOOLBOX_CACHE": str(cache)})
    result = json.loads(text.strip().splitlines()[-1])
    return {"tokens_per_s": result["decode_tokens_per_s"], "prompt_tokens_per_s": result["prompt_tokens_per_s"],
            "peak_rss_mb": result["peak_rss_mb"], "load_s": result["load_s"],
            "command": " ".join(cmd[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over every row")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (best kept), both sides")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rows", default=",".join(r for r in ROWS if not r.startswith(("L-", "3.6B-"))),
                        help="comma-separated, from: " + ", ".join(ROWS))
    parser.add_argument("--depths", default="16", help="prompt tokens / llama.cpp depth before decoding")
    parser.add_argument("--prompt", type=int, default=0, help="also measure prompt processing of this many tokens")
    parser.add_argument("--compiled", action="store_true", help="the toolbox with its compiled decode step too")
    parser.add_argument("--work", help="directory for the checkpoints, GGUF files and caches (kept)")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()

    llama = llama_dir()
    if llama is None or converter() is None:
        print("llama.cpp is not here: set LLAMA_CPP_DIR to a build with bin/llama-bench (and LLAMA_CPP_CONVERTER "
              "to convert-gptneox-gguf.py), e.g. from ../shared/tools/build-llama-cpp.sh", file=sys.stderr)
        sys.exit(2)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    depths = [int(d) for d in args.depths.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="llamacpp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    models = {"embedded": EMBEDDED, "S": work / "shape-s", "L": work / "shape-l", "3.6B": work / "shape-3b6"}
    for name, shape in (("S", None), ("L", SHAPE_L), ("3.6B", SHAPE_3B6)):
        if any(ROWS[r][0] == name for r in rows) and not (models[name] / "config.json").is_file():
            build_shape_s(models[name], *([shape] if shape else []))
    repack_pp = not has_amx()
    files = {r: gguf(llama, models[ROWS[r][0]], ROWS[r][3], work) for r in rows}

    variants = [("eager", {"compile": "0"})] + ([("compiled", {"compile": "1"})] if args.compiled else [])
    started = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average": os.getloadavg()}
    samples: dict[str, list] = {}
    cache = work / "toolbox-cache"
    for repeat in range(args.repeats):
        for row in rows:
            model, engine, dtype, kind = ROWS[row]
            for depth in depths:
                for variant, options in variants:
                    key = f"{row} {variant} @{depth}"
                    load = os.getloadavg()[0]
                    ours = toolbox_bench(models[model], engine, dtype, options, args, depth, cache)
                    theirs = llama_decode(llama, files[row], kind, args, depth)
                    ratio = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
                    samples.setdefault(key, []).append({"toolbox": ours, "llama.cpp": theirs, "ratio": ratio,
                                                        "load_average": load})
                    print(f"[{repeat + 1}/{args.repeats}] {key:28s} toolbox {ours['tokens_per_s']:8.1f}  "
                          f"llama.cpp {theirs['tokens_per_s']:8.1f}  ratio {ratio:5.2f}  load {load:.1f}", flush=True)
            if args.prompt:
                key = f"{row} prompt {args.prompt}"
                ours = toolbox_bench(models[model], engine, dtype, {"compile": "0"}, args, 16, cache)
                theirs = llama_bench(llama, files[row], args.threads, args.runs, 0, 0, args.prompt, repack_pp)
                ratio = round(ours["prompt_tokens_per_s"] / theirs["tokens_per_s"], 3)
                samples.setdefault(key, []).append({"toolbox": ours, "llama.cpp": theirs, "ratio": ratio})
                print(f"[{repeat + 1}/{args.repeats}] {key:28s} toolbox {ours['prompt_tokens_per_s']:8.1f}  "
                      f"llama.cpp {theirs['tokens_per_s']:8.1f}  ratio {ratio:5.2f}", flush=True)

    summary = {}
    for key, runs in samples.items():
        ours = [r["toolbox"]["tokens_per_s" if "prompt" not in key else "prompt_tokens_per_s"] for r in runs]
        theirs = [r["llama.cpp"]["tokens_per_s"] for r in runs]
        ratios = [r["ratio"] for r in runs]
        summary[key] = {"toolbox": [min(ours), max(ours)], "llama.cpp": [min(theirs), max(theirs)],
                        "ratio": [min(ratios), max(ratios)], "ratio_median": statistics.median(ratios),
                        "peak_rss_mb": {"toolbox": runs[-1]["toolbox"]["peak_rss_mb"],
                                        "llama.cpp": runs[-1]["llama.cpp"]["peak_rss_mb"]}}
        print(f"{key:30s} toolbox {min(ours):.0f}-{max(ours):.0f}  llama.cpp {min(theirs):.0f}-{max(theirs):.0f}  "
              f"ratio {min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f})")
    out = HERE / "results" / f"llamacpp{('_' + args.suffix) if args.suffix else ''}.json"
    out.write_text(json.dumps({
        **started, "finished_load_average": os.getloadavg(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "amx": has_amx(), "platform": platform.platform()},
        "threads": args.threads, "new_tokens": args.new_tokens, "runs": args.runs,
        "llama_cpp_prompt_repack": repack_pp, "summary": summary, "samples": samples,
    }, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
