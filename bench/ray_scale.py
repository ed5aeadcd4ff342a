"""Scaling out on Ray: serve replicas, and the batch job against `toolbox generate --input`.

    python bench/ray_scale.py [--part serve|batch|all] [--repeat 3] [--clients 16] [--duration 10]
                              [--max-tokens 32] [--random-model] [--throughput-mode] [--baseline]
                              [--prompts 600] [--batch-threads 2]

One local Ray cluster (all of this machine's CPUs, no dashboard) serves every measurement;
configurations are interleaved and repeated, so a shared machine's drifting load hits each
alike. Every run records the load average before and after it.

serve: `toolbox.ray.serve` deployed with 1 replica, then 2 (one torch thread each, the
  server's defaults), each measured with --clients closed-loop streaming clients
  (bench/serve.py's aiohttp client: exactly --max-tokens tokens per request) for
  --duration seconds after a warm-up; aggregate tokens/s. The model: the embedded one,
  or with --random-model a random GPT-NeoX of 27M parameters (hidden 512, 6 layers,
  vocab 8000; the embedded model is so small that the HTTP path costs more CPU per token
  than the model does). --throughput-mode starts the cluster with Ray Serve's throughput
  settings (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy in
  front, replicas answering HTTP themselves, no Python proxy). With --baseline, plain
  `toolbox serve` (no Ray) with 1 thread and with 2 threads too, for scale.
  Target (issue): 2 replicas >= 1.5x one replica's tokens/s at 16 clients.

batch: --prompts prompts (greedy, --max-tokens new tokens, batch size 8) through
  `toolbox generate --input` and through `toolbox generate --ray` with one actor on the
  running cluster (--ray-address), both with --batch-threads torch threads, each a
  command of its own. tokens/s = generated tokens / the command's wall time (model
  load, Ray's connect, read and actor start included); "steady" = the rate between
  the first and the last record appearing in the output file (startup excluded).
  Target (issue): the Ray job >= 85 % of `toolbox generate --input`'s tokens/s.
  --omp-passive sets OMP_WAIT_POLICY=PASSIVE for everything: on a busy host, OpenMP's
  spinning threads slow `toolbox generate --input` down several times (see
  docs/performance.md), which a comparison of Ray's overhead should leave out.

Results: bench/results/ray_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGETS = {"serve_2_vs_1_replicas_16_clients": 1.5, "batch_ray_vs_generate_input": 0.85}
SUBJECTS = ["吾輩は", "主人は", "迷亭君が", "細君は", "寒月君は", "猫が", "先生は", "下女が", "書生は", "隣の家の"]
PREDICATES = ["朝から", "縁側で", "書斎にこもって", "台所の隅で", "月の夜に", "雨の日には", "ひとりで", "黙って",
              "にこにこして", "茶の間で", "庭を眺めて", "あくびをしながら", "また", "急に", "こっそりと", "毎晩",
              "大きな声で", "静かに", "昼寝のあとで", "夕飯の前に"]


def serve_bench():
    """bench/serve.py as a module: its closed-loop streaming clients and their summary."""
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- serve --------------------------------------------------------------------------------------


def serve_part(args, ray) -> dict:
    from ray import serve

    from toolbox.commands.options import ModelChoice
    from toolbox.ray.serve import APP_NAME, Scale, application
    from toolbox.serving.state import Settings

    sb = serve_bench()
    port = sb.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    base = f"http://127.0.0.1:{port}"
    configs = [("ray, 1 replica", 1), ("ray, 2 replicas", 2)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    if args.baseline:
        runs.update({"toolbox serve, 1 thread": [], "toolbox serve, 2 threads": []})
    for k in range(args.repeat):
        order = configs if k % 2 == 0 else configs[::-1]
        for name, replicas in order:
            settings = Settings(model_process=os.name == "posix")  # `toolbox serve`'s default
            serve.run(application(ModelChoice(model=args.model, threads=1), settings, Scale(replicas)),
                      name=APP_NAME, route_prefix="/")
            runs[name].append(measure(sb, base, args))
            print(f"  {name}: {runs[name][-1]['tokens_per_s']} tokens/s (load {runs[name][-1]['load_before']})",
                  flush=True)
        serve.delete(APP_NAME)
        if args.baseline:
            for threads in (1, 2):
                name = f"toolbox serve, {threads} thread{'s' if threads > 1 else ''}"
                proc, url = start_plain_server(sb, threads, args.model)
                try:
                    runs[name].append(measure(sb, url, args))
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                print(f"  {name}: {runs[name][-1]['tokens_per_s']} tokens/s", flush=True)
    serve.shutdown()
    medians = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs["ray, 1 replica"], runs["ray, 2 replicas"])]
    return {"runs": runs, "median_tokens_per_s": medians,
            "ratio_2_vs_1_per_repeat": [round(r, 2) for r in ratios],
            "ratio_2_vs_1_of_medians": round(medians["ray, 2 replicas"] / medians["ray, 1 replica"], 2)}


def measure(sb, base: str, args) -> dict:
    before = load()
    level_args = argparse.Namespace(warmup=args.warmup, duration=args.duration, max_tokens=args.max_tokens,
                                    client="aiohttp")
    row = asyncio.run(sb.level(base, args.clients, level_args))
    return {**row, "load_before": before, "load_after": load()}


def start_plain_server(sb, threads: int, model: str | None):
    port = sb.free_port()
    cmd = [sys.executable, "-m", "toolbox", "serve", "--port", str(port), "--threads", str(threads),
           "--no-access-log", "--log-level", "warning", *(["--model", model] if model else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("toolbox serve did not become healthy in 120 s")


# -- batch --------------------------------------------------------------------------------------


def batch_part(args, address: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    src = work / "prompts.jsonl"
    texts = [s + p for s in SUBJECTS for p in PREDICATES]
    with src.open("w", encoding="utf-8") as f:
        for i in range(args.prompts):
            f.write(json.dumps({"id": i, "prompt": texts[i % len(texts)] + "、" * (i // len(texts))},
                               ensure_ascii=False) + "\n")
    common = ["--input", str(src), "--greedy", "--max-new-tokens", str(args.max_tokens), "--threads",
              str(args.batch_threads)]
    configs = [("toolbox generate --input", []), ("toolbox generate --ray, 1 actor", ["--ray", "--ray-address", address])]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    outputs = {}
    for k in range(args.repeat):
        for name, extra in (configs if k % 2 == 0 else configs[::-1]):
            out = work / f"out-{len(runs[name])}-{'ray' if extra else 'plain'}.jsonl"
            runs[name].append(timed_job([*common, "--output", str(out), *extra], out))
            outputs[name] = out
            r = runs[name][-1]
            print(f"  {name}: {r['tokens_per_s']} tokens/s end to end, {r['steady_tokens_per_s']} steady "
                  f"(load {r['load_before']})", flush=True)
    same = records(outputs[configs[0][0]]) == records(outputs[configs[1][0]])
    medians = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    steady = {name: statistics.median(r["steady_tokens_per_s"] for r in rs) for name, rs in runs.items()}
    plain, on_ray = configs[0][0], configs[1][0]
    return {"runs": runs, "median_tokens_per_s": medians, "median_steady_tokens_per_s": steady,
            "ratio_per_repeat": [round(b["tokens_per_s"] / a["tokens_per_s"], 3)
                                 for a, b in zip(runs[plain], runs[on_ray])],
            "ratio_of_medians": round(medians[on_ray] / medians[plain], 3),
            "steady_ratio_of_medians": round(steady[on_ray] / steady[plain], 3),
            "same_tokens": same}


def records(path: Path) -> list:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return sorted((r["index"], r["token_ids"]) for r in rows)


def timed_job(args: list[str], out: Path) -> dict:
    """Run one `toolbox generate` command, watching its output file grow."""
    before = load()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "toolbox", "generate", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    first = last = None
    lines = 0
    while proc.poll() is None:
        n = out.read_bytes().count(b"\n") if out.exists() else 0
        now = time.perf_counter()
        if n and first is None:
            first, first_lines = now, n
        if n != lines:
            last, lines = now, n
        time.sleep(0.02)
    wall = time.perf_counter() - started
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"toolbox generate {' '.join(args)} failed:\n{err}")
    last = time.perf_counter() if last is None else last
    tokens = sum(json.loads(line)["completion_tokens"] for line in out.read_text(encoding="utf-8").splitlines())
    rows = out.read_bytes().count(b"\n")
    steady = tokens * (rows - first_lines) / rows / (last - first) if last and first and last > first else None
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "steady_tokens_per_s": round(steady, 1) if steady else None, "load_before": before, "load_after": load()}


def build_random_model(path: Path) -> None:
    """A random GPT-NeoX (hidden 512, 6 layers, 8 heads, vocab 8000) with the embedded tokenizer."""
    import shutil

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                           vocab_size=8000, max_position_embeddings=2048, rotary_pct=1.0, tie_word_embeddings=False,
                           bos_token_id=2, eos_token_id=3)
    GPTNeoXForCausalLM(config).half().save_pretrained(path)
    shutil.copy(ROOT / "toolbox" / "data" / "embedded" / "spiece.model", path / "spiece.model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["serve", "batch", "all"], default="all")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of every configuration")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per serve run")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds at the start of each serve run")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request / per prompt")
    ap.add_argument("--baseline", action="store_true", help="serve: plain `toolbox serve` with 1 and 2 threads too")
    ap.add_argument("--random-model", action="store_true", help="serve: a random 27M-parameter model, not the embedded")
    ap.add_argument("--throughput-mode", action="store_true", help="serve: Ray Serve's throughput settings (HAProxy)")
    ap.add_argument("--prompts", type=int, default=600, help="batch: prompts in the file")
    ap.add_argument("--batch-threads", type=int, default=2, help="batch: torch threads of each command")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for every process (OpenMP threads sleep instead of spinning)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ray_scale.json"))
    args = ap.parse_args()

    args.model = None
    if args.random_model:
        args.model = str(Path(tempfile.mkdtemp(prefix="ray-scale-model-")) / "model")
        build_random_model(Path(args.model))
    if args.omp_passive:  # inherited by the commands and by the cluster's workers
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if args.throughput_mode:  # read by Ray Serve's processes when they start: before the cluster does
        os.environ.update(RAY_SERVE_THROUGHPUT_OPTIMIZED="1", RAY_SERVE_ENABLE_HA_PROXY="1")
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "ray": ray.__version__},
        "settings": vars(args),
        "targets": TARGETS,
    }
    try:
        if args.part in ("serve", "all"):
            print("serve:", flush=True)
            result["serve"] = serve_part(args, ray)
            print(f"  2 replicas / 1 replica at {args.clients} clients: {result['serve']['ratio_2_vs_1_per_repeat']}"
                  f" (of medians {result['serve']['ratio_2_vs_1_of_medians']}; target >= 1.5)", flush=True)
        if args.part in ("batch", "all"):
            print("batch:", flush=True)
            result["batch"] = batch_part(args, ray.get_runtime_context().gcs_address)
            b = result["batch"]
            print(f"  ray job / generate --input: {b['ratio_per_repeat']} (of medians {b['ratio_of_medians']}, "
                  f"steady {b['steady_ratio_of_medians']}; target >= 0.85); same tokens: {b['same_tokens']}")
    finally:
        ray.shutdown()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
