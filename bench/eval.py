"""`toolbox eval` throughput: generation against `toolbox generate --input`, multiple choice
against lm-eval's `hf` model, on the same items, side by side in one process.

    python bench/eval.py [SOURCE] [--runs N] [--threads N] [--prompts N] [--max-new-tokens N]
                         [--choice-items N] [--batch-size N] [--hf-batch-sizes 1,32]

SOURCE (default ../shared/data/wagahaiwa_nekodearu.txt) gives the items: paragraphs of the
novel (Aozora markup removed) as prompts, and next-sentence multiple-choice items (a
sentence, its true successor and three sentences from elsewhere). The model is the
embedded one (toolbox/data/embedded), fp32 on the CPU.

Generation (target: eval >= 80 % of generate's tokens/s): the same prompts, greedy,
--max-new-tokens each, --batch-size per call, through

  generate  `toolbox generate --input/--output`'s batch job (toolbox.commands.batch)
  eval      `toolbox eval generate`'s runner, metrics (MeCab ROUGE, BLEU, chrF) included

Multiple choice (target: toolbox >= 1.5x hf): the 4 x --choice-items (context, choice)
log-likelihood requests of the items, through

  hf          lm-eval's HFLM over a copy of the checkpoint (tokenizer files from
              toolbox.hf_tokenizer, sentencepiece's ids), at each of --hf-batch-sizes
  harness     the toolbox adapter (toolbox.eval.harness.ToolboxLM), same requests
  eval        `toolbox eval choice`'s runner (lm-eval's token split), acc/acc_norm included

Each method runs --runs times interleaved with the others and keeps its best time, so that
load on a shared machine hits all alike. The log-likelihoods must agree (fp32: 1e-4).
Results go to bench/results/eval.json with the load average before and after.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This directory holds tokenize.py, which would shadow the standard library's module
# (torch imports it): put the project root in its place on the path.
ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "wagahaiwa_nekodearu.txt"
TARGET_GENERATION, TARGET_CHOICE = 0.8, 1.5


def paragraphs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    text = re.sub(r"《[^》]*》|｜|［＃[^］]*］", "", text)
    return [line.strip("　 ") for line in text.splitlines() if line.startswith("　") and len(line) > 40]


def choice_items(paras: list[str], n: int, seed: int = 0) -> list[dict]:
    sentences = [[s for s in re.findall(r"[^。]*。", p) if 6 <= len(s) <= 80] for p in paras]
    pool = [s for ss in sentences for s in ss]
    rng, items = random.Random(seed), []
    for ss in sentences:
        for context, true in zip(ss, ss[1:]):
            distractors = rng.sample(pool, 3)
            label = rng.randrange(4)
            items.append({"context": context, "choices": distractors[:label] + [true] + distractors[label:],
                          "label": label})
            if len(items) == n:
                return items
    return items


def best_of(runs: int, methods: dict) -> dict:
    """Run each method `runs` times, interleaved; keep each one's best wall time and last result."""
    best, results = {}, {}
    for _ in range(runs):
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            elapsed = time.perf_counter() - start
            best[name] = min(best.get(name, elapsed), elapsed)
    return {name: (best[name], results[name]) for name in methods}


def bench_generation(model, paras, args, work: Path) -> dict:
    from toolbox.commands.batch import BatchJob
    from toolbox.eval import runner
    from toolbox.eval.tasks import Item, Task

    prompts = [p[:200] for p in paras[: args.prompts]]
    source = work / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "reference": p[:30]}, ensure_ascii=False) + "\n"
                              for p in prompts), encoding="utf-8")
    params = model.params(greedy=True, max_new_tokens=args.max_new_tokens)
    task = Task(kind="generate", input_field="prompt", reference_field="reference",
                generation={"max_new_tokens": args.max_new_tokens, "temperature": 0.0}).check()
    items = [Item(i, f"prompts.jsonl line {i + 1}", prompt=p, reference=p[:30]) for i, p in enumerate(prompts)]
    counter = {}

    def generate():
        out = work / "generate.jsonl"
        out.unlink(missing_ok=True)
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            BatchJob(str(source), str(out), "prompt", args.batch_size).run(model, params)
        records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        counter["generate"] = sum(r["completion_tokens"] for r in records)
        return [r["text"] for r in records]

    def evaluate():
        result = runner.run(task, items, runner.LocalModel(model, args.batch_size),
                            runner.RunOptions(None, args.batch_size, progress=False))
        counter["eval"] = result.tokens
        return [r["prediction"] for r in result.records]

    timed = best_of(args.runs, {"generate": generate, "eval": evaluate})
    if timed["generate"][1] != timed["eval"][1]:
        raise SystemExit("generation: eval and generate produced different texts")
    rows = {name: {"seconds": round(t, 3), "tokens": counter[name], "tokens_per_s": round(counter[name] / t, 1)}
            for name, (t, _) in timed.items()}
    ratio = rows["eval"]["tokens_per_s"] / rows["generate"]["tokens_per_s"]
    return {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
            "rows": rows, "eval_over_generate": round(ratio, 3), "target": TARGET_GENERATION,
            "met": ratio >= TARGET_GENERATION}


def bench_choice(model, paras, args, work: Path) -> dict:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from toolbox.eval import runner
    from toolbox.eval.harness import ToolboxLM
    from toolbox.eval.tasks import Item, Task
    from toolbox.hf_tokenizer import write_tokenizer_files

    items = choice_items(paras, args.choice_items)
    requests = [Instance("loglikelihood", {}, (it["context"], c), i) for it in items for i, c in enumerate(it["choices"])]
    ckpt = work / "hf"
    shutil.copytree(ROOT / "toolbox" / "data" / "embedded", ckpt)
    write_tokenizer_files(ckpt, ckpt / "spiece.model")
    tok = model.tokenizer
    harness = ToolboxLM(model, batch_size=args.batch_size * 4)
    task = Task(kind="choice", input_field="context", choices_field="choices", label_field="label", delimiter="").check()
    eval_items = [Item(i, f"item {i}", prompt=it["context"], choices=it["choices"], label=it["label"])
                  for i, it in enumerate(items)]
    methods = {}
    hf_models = {}
    for bs in args.hf_batch_sizes:
        hf_models[bs] = HFLM(pretrained=str(ckpt), dtype="float32", device="cpu", batch_size=bs)
        torch.set_num_threads(args.threads)
        enc = hf_models[bs].tok_encode
        bad = [r.args for r in requests[:200] if enc(r.args[0] + r.args[1]) != tok.encode(r.args[0] + r.args[1])]
        if bad:
            raise SystemExit(f"hf tokenizer differs from sentencepiece on {bad[0]!r}")
        methods[f"hf (batch {bs})"] = lambda m=hf_models[bs]: [x[0] for x in m.loglikelihood(requests, disable_tqdm=True)]
    methods["harness (toolbox adapter)"] = lambda: [x[0] for x in harness.loglikelihood(requests, disable_tqdm=True)]

    def evaluate():
        result = runner.run(task, eval_items, runner.LocalModel(model, args.batch_size),
                            runner.RunOptions(None, args.batch_size, progress=False))
        return [ll for r in result.records for ll in r["loglikelihoods"]]

    methods["eval choice"] = evaluate
    timed = best_of(args.runs, methods)
    reference = timed[f"hf (batch {args.hf_batch_sizes[0]})"][1]
    worst = max(abs(a - b) for (_, lls) in timed.values() for a, b in zip(lls, reference))
    if worst > 1e-4:
        raise SystemExit(f"multiple choice: log-likelihoods differ by {worst:.2e}")
    rows = {name: {"seconds": round(t, 3), "requests_per_s": round(len(requests) / t, 1)} for name, (t, _) in timed.items()}
    best_hf = min(t for name, (t, _) in timed.items() if name.startswith("hf"))
    speedups = {name: round(best_hf / t, 2) for name, (t, _) in timed.items() if not name.startswith("hf")}
    return {"items": len(items), "requests": len(requests), "rows": rows, "max_abs_diff": worst,
            "speedup_over_best_hf": speedups, "target": TARGET_CHOICE,
            "met": min(speedups.values()) >= TARGET_CHOICE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--choice-items", type=int, default=200)
    parser.add_argument("--hf-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"{args.source}: no such file (pass the novel's path)")
    load_before = os.getloadavg()
    import torch

    import toolbox

    torch.set_num_threads(args.threads)
    model = toolbox.load(threads=args.threads)
    paras = paragraphs(args.source)
    with tempfile.TemporaryDirectory() as tmp:
        generation = bench_generation(model, paras, args, Path(tmp))
        choice = bench_choice(model, paras, args, Path(tmp))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "model": "embedded (fp32, cpu)", "runs": args.runs, "generation": generation, "choice": choice,
    }
    for title, part, unit in (("generation", generation, "tokens_per_s"), ("multiple choice", choice, "requests_per_s")):
        print(f"\n{title}:")
        for name, row in part["rows"].items():
            print(f"  {name:28s} {row['seconds']:8.3f} s  {row[unit]:10,.1f} {unit.replace('_per_s', '/s')}")
    print(f"\neval / generate: {generation['eval_over_generate']:.2f} (target >= {TARGET_GENERATION})")
    print(f"toolbox over the best hf: {choice['speedup_over_best_hf']} (target >= {TARGET_CHOICE})")
    print(f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    out = ROOT / "bench" / "results" / "eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
