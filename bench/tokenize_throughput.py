"""Whole-process tokenization throughput: toolbox against spm_encode and transformers.

    python bench/tokenize_throughput.py [SOURCE] [--runs N] [--size-mb 10] [--model DIR]

SOURCE (default ../shared/data/wagahaiwa_nekodearu.txt) is converted to LF line ends
and repeated to about --size-mb megabytes in a temporary directory. Every tool then
reads that file on stdin and writes one line of ids per input line, as a separate
process, timed from start to exit (best of N, the tools interleaved so that load on
a shared machine hits them alike):

  toolbox         toolbox tokenize --format ids < input
  spm_encode      spm_encode --model=spiece.model --output_format=id < input
  hf-t5-slow      AutoTokenizer.from_pretrained(dir, use_fast=False), as the model cards
                  say: a T5Tokenizer under transformers 5, encode() line by line
                  (its ids are wrong: see docs/tokenizer.md)
  hf-backend-fast TokenizersBackend built from spiece.model (Rust tokenizers), one
                  encode_batch on its Rust backend over all lines: the faithful
                  transformers tokenizer at its fastest
  hf-backend-call the same tokenizer called as transformers users call it,
                  tok(lines, add_special_tokens=False)["input_ids"]

Each tool's ids are compared line by line with sentencepiece's Python encoder, so the
table says how fast each tool is and whether its answer is right. The cold start of
`toolbox tokenize` on one short line is timed too (best of --cold-runs).

Targets: toolbox >= 2x spm_encode, >= 8x transformers, cold start <= 0.25 s.
Results go to bench/results/tokenize.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "wagahaiwa_nekodearu.txt"
DEFAULT_MODEL = ROOT / "toolbox" / "data" / "embedded"
TARGETS = {"vs_spm_encode": 2.0, "vs_transformers": 8.0, "cold_start_s": 0.25}

# The transformers side runs in its own process (its import time is part of the cost).
HF_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
mode, model_dir = sys.argv[1], sys.argv[2]
if mode == "hf-t5-slow":
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
    except (OSError, ValueError):  # no tokenizer_config.json: the class the series declares
        from transformers import T5Tokenizer
        tok = T5Tokenizer.from_pretrained(model_dir)
    def encode(lines):
        return [tok.encode(line, add_special_tokens=False) for line in lines]
else:
    from transformers import TokenizersBackend
    tok = TokenizersBackend(**TokenizersBackend.convert_to_native_format(vocab_file=model_dir + "/spiece.model"))
    backend = tok.backend_tokenizer
    if mode == "hf-backend-call":
        def encode(lines):
            return tok(lines, add_special_tokens=False)["input_ids"]
    else:
        def encode(lines):
            return [e.ids for e in backend.encode_batch(lines, add_special_tokens=False)]
t1 = time.perf_counter()
data = sys.stdin.buffer.read().decode("utf-8")
lines = data.split("\n")
if data.endswith("\n"):
    lines.pop()
batch = encode(lines)
t2 = time.perf_counter()
sys.stdout.write("".join(" ".join(map(str, ids)) + "\n" for ids in batch))
sys.stdout.flush()
sys.stderr.write("\nHF " + json.dumps({"class": type(tok).__name__, "load_s": t1 - t0, "encode_s": t2 - t1}) + "\n")
"""


def toolbox_command() -> list[str]:
    script = Path(sys.executable).with_name("toolbox")
    return [str(script)] if script.exists() else [sys.executable, "-m", "toolbox"]


def build_input(source: Path, size_mb: float, workdir: Path) -> tuple[Path, int]:
    """The source with LF line ends, repeated to about size_mb megabytes; returns (path, copies)."""
    data = source.read_bytes().replace(b"\r\n", b"\n")
    if not data.endswith(b"\n"):
        data += b"\n"
    copies = max(1, round(size_mb * 1e6 / len(data)))
    path = workdir / "input.txt"
    path.write_bytes(data * copies)
    return path, copies


def run_once(cmd: list[str], input_path: Path, out) -> tuple[float, bytes]:
    with open(input_path, "rb") as stdin:
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdin=stdin, stdout=out, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    return elapsed, proc.stderr


def agreement(output: Path, reference: list[str]) -> float:
    """Fraction of lines whose ids equal sentencepiece's."""
    lines = output.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(reference):
        return 0.0
    return sum(a.split() == b.split() for a, b in zip(lines, reference)) / len(reference)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def spm_encode_version(binary: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "sentencepiece"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE, help="UTF-8 text to repeat")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per tool (best is kept)")
    ap.add_argument("--cold-runs", type=int, default=10, help="runs of the cold-start test")
    ap.add_argument("--size-mb", type=float, default=10.0)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="directory with spiece.model")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers tools")
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "tokenize.json")
    args = ap.parse_args()

    import sentencepiece as spm

    spiece = args.model / "spiece.model"
    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    tools: dict[str, list[str]] = {
        "toolbox": [*toolbox_command(), "tokenize", "--format", "ids", "--model", str(args.model)],
    }
    spm_encode = shutil.which("spm_encode")
    if spm_encode:
        tools["spm_encode"] = [spm_encode, f"--model={spiece}", "--output_format=id"]
    else:
        print("spm_encode not found: skipped", file=sys.stderr)
    if not args.no_transformers and package_version("transformers"):
        for mode in ("hf-t5-slow", "hf-backend-fast", "hf-backend-call"):
            tools[mode] = [sys.executable, "-c", HF_SCRIPT, mode, str(args.model)]

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        workdir = Path(tmp)
        input_path, copies = build_input(args.source, args.size_mb, workdir)
        size = input_path.stat().st_size
        lines = input_path.read_text(encoding="utf-8").split("\n")[:-1]
        t0 = time.perf_counter()
        reference_ids = sp.encode(lines)
        sp_inprocess_s = time.perf_counter() - t0
        tokens = sum(map(len, reference_ids))
        reference = [" ".join(map(str, ids)) for ids in reference_ids]
        print(f"input: {args.source.name} x{copies} = {size / 1e6:.2f} MB, "
              f"{len(lines)} lines, {tokens} tokens; best of {args.runs}", file=sys.stderr)

        results: dict[str, dict] = {}
        for name, cmd in tools.items():  # one checked run each, output kept for the comparison
            out_path = workdir / f"{name}.out"
            with open(out_path, "wb") as out:
                elapsed, stderr = run_once(cmd, input_path, out)
            results[name] = {"command": cmd, "times_s": [elapsed], "agreement": agreement(out_path, reference)}
            marker = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.startswith("HF ")]
            if marker:
                results[name]["transformers"] = json.loads(marker[-1][3:])
            out_path.unlink()
        with open(os.devnull, "wb") as devnull:
            for _ in range(max(0, args.runs - 1)):
                for name, cmd in tools.items():
                    results[name]["times_s"].append(run_once(cmd, input_path, devnull)[0])

        cold_cmd = [*toolbox_command(), "tokenize", "--format", "ids", "--model", str(args.model), "吾輩は猫である。"]
        cold = []
        for _ in range(args.cold_runs):
            start = time.perf_counter()
            subprocess.run(cold_cmd, stdout=subprocess.DEVNULL, check=True)
            cold.append(time.perf_counter() - start)

    for r in results.values():
        r["best_s"] = min(r["times_s"])
        r["mb_per_s"] = size / r["best_s"] / 1e6
        r["mtokens_per_s"] = tokens / r["best_s"] / 1e6
    best = {name: r["best_s"] for name, r in results.items()}
    ratios = {}
    if "spm_encode" in best:
        ratios["vs_spm_encode"] = best["spm_encode"] / best["toolbox"]
    hf = {name: t for name, t in best.items() if name.startswith("hf-")}
    for name, t in hf.items():
        ratios[f"vs_{name}"] = t / best["toolbox"]
    if hf:
        ratios["vs_transformers"] = min(hf.values()) / best["toolbox"]  # against its fastest path
    cold_best = min(cold)

    print(f"\n{'tool':<16} {'best s':>8} {'MB/s':>8} {'Mtok/s':>8} {'ids = sentencepiece':>20}")
    for name, r in results.items():
        print(f"{name:<16} {r['best_s']:8.3f} {r['mb_per_s']:8.1f} {r['mtokens_per_s']:8.2f} {r['agreement']:19.2%}")
        if "transformers" in r:
            t = r["transformers"]
            print(f"{'':<16} ({t['class']}: load {t['load_s']:.2f} s, encode {t['encode_s']:.2f} s in-process)")
    print(f"{'(sentencepiece in-process, one batch, for reference)':<52} {size / sp_inprocess_s / 1e6:8.1f} MB/s")
    print()
    checks = {}
    for key, value in ratios.items():
        target = TARGETS.get(key)
        verdict = "" if target is None else ("  ok" if value >= target else f"  MISSES {target:g}x")
        checks[key] = None if target is None else value >= target
        print(f"toolbox {key.replace('_', ' ')}: {value:5.2f}x{verdict}")
    checks["cold_start_s"] = cold_best <= TARGETS["cold_start_s"]
    print(f"cold start (`toolbox tokenize` one line, best of {len(cold)}): {cold_best:.3f} s"
          f"{'  ok' if checks['cold_start_s'] else '  MISSES 0.25 s'}")
    print(f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # 1/5/15-minute load averages: other work on the machine skews every figure
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "versions": {
            "sentencepiece": package_version("sentencepiece"),
            "transformers": package_version("transformers"),
            "tokenizers": package_version("tokenizers"),
            "spm_encode (Debian sentencepiece)": spm_encode_version(spm_encode) if spm_encode else None,
        },
        "input": {"source": str(args.source), "copies": copies, "bytes": size, "lines": len(lines), "tokens": tokens},
        "runs": args.runs,
        "model": str(spiece),
        "results": results,
        "ratios": ratios,
        "cold_start": {"command": cold_cmd, "times_s": cold, "best_s": cold_best},
        "targets": TARGETS,
        "meets_targets": checks,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
