"""Serving throughput and latency under concurrent streaming clients.

    python bench/serve.py [--model embedded] [--clients 1,4,16,64] [--duration 10] [--max-tokens 32]

Starts `toolbox serve` on a free loopback port (CPU backend unless --backend says
otherwise), then for each client count runs that many closed-loop clients (aiohttp,
or httpx with --client httpx; asyncio): each sends a streaming /v1/completions request (max_tokens = min_tokens =
--max-tokens, so every request generates exactly that many tokens), reads the stream
to the end and immediately sends the next one, for --duration seconds after a
--warmup. With --repeat N the sweep runs N times (interleaved) and each level reports
its median run. Measured per level:

  tokens/s   generated tokens received by all clients in the window / window length
  TTFT       time from sending a request to its first token chunk (p50, p95)
  latency    time from sending a request to its [DONE] (p50)

--engine drives the server's engine in-process with the same closed loop (no HTTP,
no JSON): the ceiling that batching sets, to tell batching from transport costs.

Targets (issue): 16 clients >= 4x the tokens/s of 1 client; p50 TTFT at 16 clients
<= 3x the 1-client figure. Results go to bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["吾輩は猫である。", "主人は", "「君、", "どこで生れたか", "名前はまだ無い。", "迷亭は"]
TARGETS = {"throughput_16_vs_1": 4.0, "ttft_p50_16_vs_1": 3.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "toolbox", "serve", "--port", str(port), "--model", args.model,
           "--backend", args.backend, "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024",
           "--no-access-log", "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not args.model_process:
        cmd += ["--no-model-process"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not become healthy in 120 s")


async def client(post, k: int, args, stop_at: float, window: tuple, out: dict) -> None:
    """One closed-loop client; `post(body)` is an async context manager giving (status, async chunk iterator)."""
    i = k
    while time.perf_counter() < stop_at:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "min_tokens": args.max_tokens,
                "temperature": 0.8, "stream": True, "return_token_ids": True}
        i += 1
        sent = time.perf_counter()
        first = None
        async with post(body) as (status, chunks):
            if status != 200:
                out["errors"] += 1
                await asyncio.sleep(0.05)
                continue
            # raw bytes, no text decoding: with return_token_ids every token is one event, so
            # counting events is enough (keeps the client's CPU use, which shares the machine, low)
            buf = b""
            async for raw in chunks:
                now = time.perf_counter()
                *events, buf = (buf + raw).split(b"\n\n")
                done = bool(events) and events[-1] == b"data: [DONE]"
                tokens = len(events) - done
                if first is None and tokens:
                    first = now
                    if window[0] <= sent <= window[1]:
                        out["ttft"].append(first - sent)
                if window[0] <= now <= window[1]:
                    out["tokens"] += tokens
                if done:
                    if sent >= window[0] and now <= window[1]:
                        out["latency"].append(now - sent)
                    break
        out["requests"] += 1


@contextlib.asynccontextmanager
async def http_session(base: str, clients: int, kind: str):
    """`post(body)` for `client`, over aiohttp (default: its C parser keeps the client's CPU cost,
    which shares this machine with the server, low) or httpx (for comparison)."""
    url = base + "/v1/completions"
    if kind == "httpx":
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            @contextlib.asynccontextmanager
            async def post(body):
                async with http.stream("POST", url, json=body) as r:
                    yield r.status_code, r.aiter_raw()
            yield post
        return
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        @contextlib.asynccontextmanager
        async def post(body):
            async with http.post(url, json=body) as r:
                yield r.status, r.content.iter_any()
        yield post


async def level(base: str, clients: int, args) -> dict:
    async with http_session(base, clients, args.client) as post:
        start = time.perf_counter()
        window = (start + args.warmup, start + args.warmup + args.duration)
        out = {"tokens": 0, "ttft": [], "latency": [], "requests": 0, "errors": 0}
        await asyncio.gather(*(client(post, k, args, window[1], window, out) for k in range(clients)))
    return summarize(clients, out, args)


async def engine_level(engine, clients: int, args) -> dict:
    """The same closed loop against the engine in this process: no HTTP, no JSON (the batching ceiling)."""
    from toolbox.backend import GenerationParams
    from toolbox.serving.engine import SequenceSpec

    params = GenerationParams(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, temperature=0.8)
    prompts = [engine.model.tokenizer.encode(p) for p in PROMPTS]
    start = time.perf_counter()
    window = (start + args.warmup, start + args.warmup + args.duration)
    out = {"tokens": 0, "ttft": [], "latency": [], "requests": 0, "errors": 0}

    async def one(k: int) -> None:
        i = k
        while time.perf_counter() < window[1]:
            sent = time.perf_counter()
            first = None
            sub = engine.submit([SequenceSpec(prompts[i % len(prompts)], params)])
            i += 1
            async for batch in sub.batches():
                now = time.perf_counter()
                if first is None:
                    first = now
                    if window[0] <= sent <= window[1]:
                        out["ttft"].append(now - sent)
                if window[0] <= now <= window[1]:
                    out["tokens"] += len(batch)
            if sent >= window[0] and now <= window[1]:
                out["latency"].append(now - sent)
            out["requests"] += 1

    await asyncio.gather(*(one(k) for k in range(clients)))
    return summarize(clients, out, args)


def summarize(clients: int, out: dict, args) -> dict:
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) >= 2 else (xs[0] if xs else None)  # noqa: E731
    return {
        "clients": clients,
        "tokens_per_s": round(out["tokens"] / args.duration, 1),
        "ttft_p50_s": round(statistics.median(out["ttft"]), 4) if out["ttft"] else None,
        "ttft_p95_s": round(q(out["ttft"], 95), 4) if out["ttft"] else None,
        "latency_p50_s": round(statistics.median(out["latency"]), 4) if out["latency"] else None,
        "requests": out["requests"],
        "errors": out["errors"],
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (its TTFT and latency kept with it), plus every run's tokens/s."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    row["runs_ttft_p50_s"] = [r["ttft_p50_s"] for r in runs]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds at the start of each level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="sweeps over the client counts; each level reports its median run")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--model-process", action=argparse.BooleanOptionalAction, default=True,
                    help="the server's model in a process of its own (its default) or on a thread of the server")
    ap.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp",
                    help="the benchmark's HTTP client (aiohttp: the lighter one, see docs/performance.md)")
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--engine", action="store_true",
                    help="drive the engine in this process instead (no HTTP): the batching ceiling")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = ap.parse_args()

    proc = engine = None
    if args.engine:
        from toolbox.api import load
        from toolbox.serving.engine import Engine

        loaded = load(args.model, args.backend, threads=args.threads, workload="generate")  # as `toolbox serve` does
        engine = Engine(loaded.loaded, args.max_batch_size, 1024)
        engine.start()
    elif args.url:
        base = args.url.rstrip("/")
    else:
        port = free_port()
        proc = start_server(args, port)
        base = f"http://127.0.0.1:{port}"
    counts = [int(c) for c in args.clients.split(",")]
    runs: dict[int, list[dict]] = {c: [] for c in counts}
    try:
        for _ in range(args.repeat):  # sweeps interleaved, so drifting load on a shared machine hits every level
            for c in counts:
                runs[c].append(asyncio.run(engine_level(engine, c, args) if engine else level(base, c, args)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        if engine is not None:
            engine.drain(10)

    rows = [median_run(runs[c]) for c in counts]
    by = {r["clients"]: r for r in rows}
    one = by.get(1)
    print(f"{'clients':>7} {'tokens/s':>9} {'x 1 client':>10} {'TTFT p50':>9} {'TTFT p95':>9} {'latency p50':>11} "
          f"{'requests':>8} {'errors':>6}")
    for r in rows:
        speedup = r["tokens_per_s"] / one["tokens_per_s"] if one and one["tokens_per_s"] else None
        r["speedup_vs_1"] = round(speedup, 2) if speedup else None
        fmt = lambda v: f"{v * 1000:.0f} ms" if v is not None else "-"  # noqa: E731
        print(f"{r['clients']:>7} {r['tokens_per_s']:>9.1f} {r['speedup_vs_1'] or 0:>10.2f} {fmt(r['ttft_p50_s']):>9} "
              f"{fmt(r['ttft_p95_s']):>9} {fmt(r['latency_p50_s']):>11} {r['requests']:>8} {r['errors']:>6}")
    checks = {}
    if one and 16 in by:
        checks["throughput_16_vs_1"] = by[16]["speedup_vs_1"]
        if one["ttft_p50_s"] and by[16]["ttft_p50_s"]:
            checks["ttft_p50_16_vs_1"] = round(by[16]["ttft_p50_s"] / one["ttft_p50_s"], 2)
        print(f"16 clients: {checks.get('throughput_16_vs_1')}x the tokens/s of 1 (target >= 4); "
              f"p50 TTFT {checks.get('ttft_p50_16_vs_1')}x the unloaded figure (target <= 3)")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "settings": {k: getattr(args, k) for k in ("model", "backend", "threads", "model_process", "client", "duration",
                                                   "warmup", "max_tokens", "max_batch_size", "repeat", "engine")},
        "load_average_after": os.getloadavg(),
        "levels": rows,
        "checks": checks,
        "targets": TARGETS,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
