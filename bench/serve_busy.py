"""`toolbox serve` on a busy host: today's defaults against the earlier ones, side by side.

    python bench/serve_busy.py [--busy 2] [--clients 1,16] [--duration 8] [--repeat 2]

While --busy processes keep every core busy (plain Python loops at normal priority, as
other work on a shared host would), it starts the server twice, interleaved: with its
defaults (the model on one thread fewer than the CPUs, OpenMP threads that sleep when
idle) and with the earlier defaults (one thread per CPU, OpenMP's spinning wait), and
runs bench/serve.py's closed-loop streaming clients against each. Results go to
bench/results/serve_busy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402  (bench/serve.py)

ROOT = Path(__file__).resolve().parent.parent


def spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="processes keeping the CPUs busy")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_busy.json"))
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    configs = {
        "defaults": (None, {}),
        f"earlier defaults ({cpus} threads, spinning OpenMP)": (cpus, {"OMP_WAIT_POLICY": "ACTIVE"}),
    }
    counts = [int(c) for c in args.clients.split(",")]
    runs = {(name, c): [] for name in configs for c in counts}
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for h in hogs:
        h.start()
    try:
        for _ in range(args.repeat):
            for name, (threads, env) in configs.items():
                opts = argparse.Namespace(model=args.model, backend="cpu", threads=threads, max_batch_size=64,
                                          model_process=True, client="aiohttp", max_tokens=args.max_tokens,
                                          duration=args.duration, warmup=args.warmup)
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                port = bench.free_port()
                proc = bench.start_server(opts, port)
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
                try:
                    for c in counts:
                        runs[(name, c)].append(asyncio.run(bench.level(f"http://127.0.0.1:{port}", c, opts)))
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
    finally:
        for h in hogs:
            h.terminate()
    rows = []
    print(f"{'configuration':<45} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9}   runs (tokens/s)")
    for (name, c), rs in runs.items():
        row = {"configuration": name, **bench.median_run(rs)}
        rows.append(row)
        ttft = f"{row['ttft_p50_s'] * 1000:.0f} ms" if row["ttft_p50_s"] else "-"
        print(f"{name:<45} {c:>7} {row['tokens_per_s']:>9.1f} {ttft:>9}   {row['runs_tokens_per_s']}")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": cpus},
        "settings": vars(args),
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
