"""Scoring throughput: toolbox's runtime against transformers' forward + loss, on the same batches.

    python bench/score.py [SOURCE] [--runs N] [--threads 1,2] [--dtype float32|bfloat16] [--limit-tokens N]
    python bench/score.py --gpu [--runs N] [--windows N]

CPU mode (default). SOURCE (default ../shared/data/wagahaiwa_nekodearu.txt, the whole
novel, CRLF converted to LF) is tokenized as one document and cut into the sliding
windows `toolbox score` uses (window = the model's context, stride = window / 2; see
docs/score.md). The windows are grouped into batches of at most --batch-tokens padded
tokens, and each batch is scored by

  toolbox       the cpu backend's `RuntimeModel.score_from(batch, first)`: log-probability
                and rank of every target token (the output layer runs for targets only),
                loaded for a long run of scoring as `toolbox score` on files is, so with
                the token-score library (`toolbox.runtime.score_kernel`, built once)
  transformers  `GPTNeoXForCausalLM(input_ids, attention_mask, labels).loss` with the
                context positions labelled -100 (the usual sliding-window recipe)

on the embedded model (toolbox/data/embedded; a random model of the same shape when it
is missing). The two run interleaved batch by batch, --runs times; each batch keeps its
best time, so that load on a shared machine hits both alike. Throughput is scored tokens
(document tokens) per second; window tokens per second (positions through the model) are
shown too. The two totals must agree (fp32: within 1e-5 relative). Each thread count in
--threads (default 1 and 2) is a separate case: on a busy 2-core machine a second thread
can cost more than it gives, and it does not cost both methods alike. Target: toolbox >= 1.5x.

GPU mode (--gpu): the 3.6B shape (36 layers, hidden 2816, vocab 32000, context 2048) with
random fp16 weights shared by both models, on CUDA, over --windows windows of 2048 tokens
(stride 1024), batch 1 and 2 windows, plus all-positions 1 x 2048 (the figure
transformers was measured at: 54,000 tokens/s on an H200). Target: toolbox >= 1.2x that.
`--gpu --device cpu --shape smoke` runs the same code on a tiny fp32 model in seconds (a
check of the script, not a measurement). Without CUDA, --gpu exits with status 2.

Results go to bench/results/score.json (score-gpu.json for --gpu).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This directory holds tokenize.py, which would shadow the standard library's module
# (torch imports it): put the project root in its place on the path.
ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

import argparse  # noqa: E402 - after the sys.path fix above
import datetime  # noqa: E402 - after the sys.path fix above
import json  # noqa: E402 - after the sys.path fix above
import os  # noqa: E402 - after the sys.path fix above
import platform  # noqa: E402 - after the sys.path fix above
import shutil  # noqa: E402 - after the sys.path fix above
import tempfile  # noqa: E402 - after the sys.path fix above
import time  # noqa: E402 - after the sys.path fix above
from importlib.metadata import PackageNotFoundError, version  # noqa: E402 - after the sys.path fix above

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "wagahaiwa_nekodearu.txt"
EMBEDDED = ROOT / "toolbox" / "data" / "embedded"
TARGET_CPU, TARGET_GPU, HF_H200 = 1.5, 1.2, 54_000
# The embedded model's shape, used when its files are missing (being rebuilt).
EMBEDDED_SHAPE = dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=1024, max_position_embeddings=512)
SERIES_SHAPE = dict(vocab_size=32000, hidden_size=2816, num_hidden_layers=36, num_attention_heads=22,
                    intermediate_size=11264, max_position_embeddings=2048)
# --gpu --shape smoke --device cpu: the same code path in seconds, to check the script itself.
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=256, max_position_embeddings=128)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def hf_config(shape: dict):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**shape, rotary_pct=1.0, rotary_emb_base=10000, use_parallel_residual=False,
                         tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, hidden_act="gelu")


def model_dir(workdir: Path) -> tuple[Path, str]:
    """The embedded checkpoint, or a random model of its shape saved under workdir."""
    if (EMBEDDED / "config.json").is_file() and any(EMBEDDED.glob("*.safetensors")) and (EMBEDDED / "spiece.model").is_file():
        return EMBEDDED, "embedded"
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    path = workdir / "random-embedded-shape"
    GPTNeoXForCausalLM(hf_config(EMBEDDED_SHAPE)).save_pretrained(path)
    if not (EMBEDDED / "spiece.model").is_file():
        raise SystemExit(f"bench/score.py: {EMBEDDED / 'spiece.model'} is missing too; cannot tokenize")
    shutil.copy(EMBEDDED / "spiece.model", path / "spiece.model")
    return path, "random weights, embedded shape (the embedded model is missing)"


def make_batches(windows, batch_tokens: int):
    """Consecutive windows grouped so that a batch holds at most batch_tokens padded positions."""
    batches, cur = [], []
    for w in windows:
        if cur and (len(cur) + 1) * max(len(w[0]), *(len(x[0]) for x in cur)) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(w)
    if cur:
        batches.append(cur)
    return batches


def hf_inputs(batch, device):
    """input_ids, attention_mask (None when unpadded) and labels (-100: context and padding)."""
    import torch

    T = max(len(seq) for seq, _ in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, (seq, first) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, first : len(seq)] = torch.tensor(seq[first:])
        mask[i, : len(seq)] = 1
    ragged = any(len(seq) != T for seq, _ in batch)
    return ids.to(device), (mask.to(device) if ragged else None), labels.to(device)


def time_pair(ours, hf, batches, runs: int, device: str, sync) -> dict:
    """Best time per batch for each method over `runs` interleaved passes; totals for the check."""
    import torch

    hf_args = [hf_inputs(b, device) for b in batches]
    best = {"toolbox": [float("inf")] * len(batches), "transformers": [float("inf")] * len(batches)}
    totals = {"toolbox": 0.0, "transformers": 0.0}

    def run_ours(k):
        b = batches[k]
        res = ours.score_from([s for s, _ in b], [f for _, f in b])
        return sum(sum(r.logprobs) for r in res)

    def run_hf(k):
        ids, mask, labels = hf_args[k]
        with torch.inference_mode():
            loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        return -loss.item() * n

    for r in range(runs):
        for k in range(len(batches)):
            order = [("toolbox", run_ours), ("transformers", run_hf)]
            if (r + k) % 2:
                order.reverse()
            for name, fn in order:
                sync()
                t0 = time.perf_counter()
                total = fn(k)
                sync()
                best[name][k] = min(best[name][k], time.perf_counter() - t0)
                if r == 0:
                    totals[name] += total
    return {"seconds": {name: sum(v) for name, v in best.items()}, "totals": totals}


def report_rows(result: dict, scored: int, positions: int) -> dict:
    out = {}
    for name, seconds in result["seconds"].items():
        out[name] = {"seconds": round(seconds, 4), "scored_tokens_per_s": round(scored / seconds, 1),
                     "window_tokens_per_s": round(positions / seconds, 1), "total_logprob": result["totals"][name]}
    out["speedup"] = round(result["seconds"]["transformers"] / result["seconds"]["toolbox"], 3)
    a, b = result["totals"]["toolbox"], result["totals"]["transformers"]
    out["total_rel_diff"] = abs(a - b) / max(abs(b), 1e-30)
    return out


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'case':<34} {'method':<13} {'seconds':>9} {'scored tok/s':>13} {'window tok/s':>13} {'speedup':>8}")
    for case, r in rows.items():
        for name in ("toolbox", "transformers"):
            m = r[name]
            sp = f"{r['speedup']:.2f}x" if name == "toolbox" else ""
            print(f"{case:<34} {name:<13} {m['seconds']:>9.3f} {m['scored_tokens_per_s']:>13,.0f} "
                  f"{m['window_tokens_per_s']:>13,.0f} {sp:>8}")
        print(f"{'':<34} totals agree to {r['total_rel_diff']:.1e} (relative)")


def cpu_main(args) -> dict:
    import torch
    from transformers import GPTNeoXForCausalLM

    from toolbox.backend import LoadOptions
    from toolbox.backends import registered as backends
    from toolbox.scoring import plan_windows
    from toolbox.tokenizer import Tokenizer

    threads = [int(t) for t in str(args.threads).split(",")]
    torch.set_num_threads(threads[0])
    workdir = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        path, model_note = model_dir(workdir)
        # a long run of scoring: the token-score library is built (once per machine and thread
        # count) or loaded, so the model is loaded again for each thread count below
        ours = backends()["cpu"].load(path, LoadOptions(dtype=args.dtype, workload="score"))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        hf = GPTNeoXForCausalLM.from_pretrained(path, dtype=dtype).eval()
        text = args.source.read_bytes().decode("utf-8").replace("\r\n", "\n")
        ids = Tokenizer(path / "spiece.model").encode(text)
        if args.limit_tokens:
            ids = ids[: args.limit_tokens]
        W = args.window or ours.context_length
        S = args.stride or W // 2
        plan = plan_windows(len(ids), W, S)
        windows = [(ids[w.start : w.end], w.context) for w in plan]
        batches = make_batches(windows, args.batch_tokens)
        scored = sum(len(s) - f for s, f in windows)
        positions = sum(len(s) for s, _ in windows)
        print(f"model: {path} ({model_note}); {args.dtype}")
        print(f"input: {args.source.name}, {len(text):,} characters, {len(ids):,} tokens -> {len(windows)} windows "
              f"(W {W}, S {S}), {len(batches)} batches of <= {args.batch_tokens} tokens; {args.runs} runs")
        rows = {}
        for n in threads:
            torch.set_num_threads(n)
            ours = backends()["cpu"].load(path, LoadOptions(dtype=args.dtype, workload="score"))
            time_pair(ours, hf, batches[:2], 1, "cpu", lambda: None)  # warm-up (first calls allocate)
            result = time_pair(ours, hf, batches, args.runs, "cpu", lambda: None)
            rows[f"novel, W {W} S {S}, {args.dtype}, {n} thr"] = report_rows(result, scored, positions)
        print_table("CPU scoring throughput (best per batch over runs)", rows)
        return {
            "mode": "cpu",
            "model": model_note,
            "dtype": args.dtype,
            "threads": threads,
            "source": args.source.name,
            "characters": len(text),
            "tokens": len(ids),
            "window": W,
            "stride": S,
            "windows": len(windows),
            "batches": len(batches),
            "batch_tokens": args.batch_tokens,
            "runs": args.runs,
            "scored_tokens": scored,
            "window_tokens": positions,
            "results": rows,
            "target_speedup": TARGET_CPU,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def gpu_main(args) -> dict:
    import torch

    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("bench/score.py --gpu: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        raise SystemExit(2)
    from transformers import GPTNeoXForCausalLM

    from toolbox.config import NeoXConfig
    from toolbox.registry import EMBEDDED_DIR
    from toolbox.runtime.loaded import RuntimeModel
    from toolbox.runtime.model import GPTNeoX
    from toolbox.scoring import plan_windows
    from toolbox.tokenizer import Tokenizer

    torch.manual_seed(0)
    shape = SERIES_SHAPE if args.shape == "series" else SMOKE_SHAPE
    cfg = hf_config(shape)
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    with torch.device(dev):
        hf = GPTNeoXForCausalLM._from_config(cfg, dtype=dtype).eval()
    # Our module shares the very same weight tensors (no second copy).
    with torch.device("meta"):
        module = GPTNeoX(NeoXConfig.from_dict(cfg.to_dict()))
    expected = {name: tuple(p.shape) for name, p in module.named_parameters()}
    # transformers 5 calls the output layer lm_head (checkpoints keep embed_out).
    state = {k.removeprefix("gpt_neox.").replace("lm_head.", "embed_out."): v for k, v in hf.state_dict().items()}
    missing = expected - state.keys()
    if missing:
        raise SystemExit(f"bench/score.py --gpu: transformers' model lacks {sorted(missing)}")
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    module._init_rotary(torch.device(dev))
    module = module.eval().requires_grad_(False)
    ours = RuntimeModel(module, Tokenizer(EMBEDDED_DIR / "spiece.model"), {"backend": "bench", "dtype": str(dtype)})
    build_s = time.perf_counter() - t0
    W = shape["max_position_embeddings"]
    S = W // 2
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(4, cfg.vocab_size, (W + (args.windows - 1) * S,), generator=g).tolist()
    windows = [(doc[w.start : w.end], w.context) for w in plan_windows(len(doc), W, S)]
    full = [(torch.randint(4, cfg.vocab_size, (W,), generator=g).tolist(), 1) for _ in range(args.windows)]
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    rows = {}
    cases = [(f"all positions, 1 x {W}", full, 1), (f"sliding W {W} S {S}, 1 x {W}", windows, 1),
             (f"sliding W {W} S {S}, 2 x {W}", windows, 2)]
    for title, wins, per_batch in cases:
        batches = [wins[i : i + per_batch] for i in range(0, len(wins), per_batch)]
        time_pair(ours, hf, batches[:2], 1, dev, sync)  # warm-up
        result = time_pair(ours, hf, batches, args.runs, dev, sync)
        rows[title] = report_rows(result, sum(len(s) - f for s, f in wins), sum(len(s) for s, _ in wins))
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else dev
    print(f"device: {name}; {args.shape} shape, random {dtype} weights (built in {build_s:.1f} s)")
    print_table("GPU scoring throughput (window tokens/s is the unit of the 54,000 reference)", rows)
    best = max(r["toolbox"]["window_tokens_per_s"] for r in rows.values())
    print(f"\nbest toolbox window tokens/s {best:,.0f}; target {TARGET_GPU} x {HF_H200:,} = {TARGET_GPU * HF_H200:,.0f}")
    return {"mode": "gpu", "device": name, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
            "windows": args.windows, "runs": args.runs, "results": rows,
            "target": {"speedup": TARGET_GPU, "transformers_h200_tokens_per_s": HF_H200}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--gpu", action="store_true", help="the 3.6B shape on CUDA, fp16, 2048-token windows")
    ap.add_argument("--runs", type=int, default=2, help="interleaved passes; each batch keeps its best time")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, one case each")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--window", type=int, default=None, help="default: the model's context")
    ap.add_argument("--stride", type=int, default=None, help="default: window // 2")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch (the runtime's default)")
    ap.add_argument("--limit-tokens", type=int, default=None, help="score only the first N tokens of SOURCE")
    ap.add_argument("--windows", type=int, default=16, help="--gpu: windows per case")
    ap.add_argument("--device", default="cuda", help="--gpu: the device (cpu runs the code path, fp32)")
    ap.add_argument("--shape", choices=["series", "smoke"], default="series",
                    help="--gpu: the 3.6B shape, or a tiny one to check the script")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    if args.gpu:
        report = gpu_main(args)
        output = args.output or ROOT / "bench" / "results" / "score-gpu.json"
    else:
        if not args.source.is_file():
            ap.error(f"{args.source} not found")
        report = cpu_main(args)
        output = args.output or ROOT / "bench" / "results" / "score.json"
    import torch

    report.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": package_version("transformers")},
    })
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten to {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")


if __name__ == "__main__":
    main()
