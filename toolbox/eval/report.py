"""Summaries of a run (value and bootstrap 95 % interval per metric) and of two runs compared.

Both work from per-item records alone (a run's JSONL), so a summary of a resumed run is the
summary of the whole run, and `eval compare` needs nothing but the two output files.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from toolbox.errors import ToolboxError
from toolbox.eval.metrics import aggregate_for, bleu_metric
from toolbox.eval.stats import RESAMPLES, bootstrap, paired_bootstrap

SCALE = {"bleu": "0-100", "chrf": "0-100", "ppl": "perplexity"}  # every other metric is 0-1


def _rows(agg, records: list[dict]) -> np.ndarray:
    return np.array([agg.row(r) for r in records], dtype=float).reshape(len(records), -1)


def metric_table(names, records: list[dict], resamples: int, seed: int) -> dict:
    out = {}
    for name in names:
        agg = aggregate_for(name)
        est = bootstrap(agg, _rows(agg, records), resamples, seed)
        out[name] = {"value": est.value, "ci95": [est.low, est.high], "scale": SCALE.get(name, "0-1")}
    return out


def summarize(task, loaded, result, model_name: str | None, output: Path | None,
              resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The run's summary: what was evaluated, on what, how, and each metric with its interval."""
    summary = {
        "task": task.name,
        "kind": task.kind,
        "model": model_name,
        "data": loaded.label,
        "items": len(result.records),
        "records_in_source": loaded.total,
        "invalid_skipped": loaded.invalid,
        "limit": task.limit,
        "new_items": result.new,
        "resumed_items": len(result.records) - result.new,
    }
    if result.tokenizer is not None:
        summary["metric_tokenizer"] = result.tokenizer.to_json()
        if "bleu" in task.metric_names:
            bleu = bleu_metric(result.tokenizer.bleu_tokenize)
            bleu.corpus_score(["-"], [["-"]])  # sacrebleu knows the reference count only after a score
            summary["metric_tokenizer"]["bleu_signature"] = str(bleu.get_signature())
    summary["metrics"] = metric_table(task.metric_names, result.records, resamples, seed)
    summary["bootstrap"] = {"resamples": resamples, "seed": seed}
    summary["tokens"] = result.tokens
    summary["elapsed_s"] = round(result.elapsed, 3)
    summary["tokens_per_s"] = round(result.tokens / result.elapsed, 1) if result.elapsed > 0 and result.tokens else None
    summary["output"] = str(output) if output else None
    return summary


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    model = summary["model"] or "-"
    console.print(f"task {summary['task']} ({summary['kind']}) · model {model} · data {summary['data']}", markup=False)
    skipped = f", {summary['invalid_skipped']} invalid records skipped" if summary["invalid_skipped"] else ""
    console.print(f"{summary['items']} items ({summary['new_items']} new, {summary['resumed_items']} resumed from the "
                  f"output){skipped}", markup=False)
    tok = summary.get("metric_tokenizer")
    if tok:
        console.print(f"metric tokenizer: {tok['name']} ({tok['reason']}; {tok['detail']}; "
                      f"BLEU tokenize={tok['bleu_tokenize']})", markup=False)
    table = Table(show_edge=False)
    for col in ("metric", "value", "95% CI", "scale"):
        table.add_column(col, justify="left" if col in ("metric", "scale") else "right", no_wrap=True)
    for name, m in summary["metrics"].items():
        lo, hi = m["ci95"]
        table.add_row(name, _fmt(m["value"]), f"{_fmt(lo)} – {_fmt(hi)}", m["scale"])
    console.print(table)
    if summary.get("tokens_per_s"):
        console.print(f"{summary['tokens']:,} tokens in {summary['elapsed_s']:.1f} s "
                      f"({summary['tokens_per_s']:,.1f} tokens/s)", markup=False)


# -- compare ---------------------------------------------------------------------------


def read_run(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ToolboxError(f"{path}: no such file")
    records = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                record["key"], record["metrics"]
            except (ValueError, KeyError, TypeError):
                raise ToolboxError(f"{path} line {lineno}: not an eval record "
                                   "(written by `toolbox eval ... --output`?)") from None
            records.append(record)
    if not records:
        raise ToolboxError(f"{path}: no records")
    return records


def _same_item(a: dict, b: dict, path_b: str) -> None:
    for name in ("reference", "label", "text"):
        if a.get(name) != b.get(name):
            raise ToolboxError(f"{path_b}: item {a['key']!r} has another {name} than in the first run; "
                               "compare runs on the same data")


def compare(path_a: str, path_b: str, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Run B against run A on the items both have: per metric A, B, B - A with its paired
    bootstrap interval, and how many items B won, tied and lost."""
    a_records, b_records = read_run(path_a), read_run(path_b)
    tok_a = {r.get("tokenizer") for r in a_records}
    tok_b = {r.get("tokenizer") for r in b_records}
    if tok_a != tok_b:
        raise ToolboxError(f"the runs used different metric tokenizers ({', '.join(map(str, tok_a))} vs "
                           f"{', '.join(map(str, tok_b))}); rescore one with --predictions and --metric-tokenizer")
    by_key = {json.dumps(r["key"]): r for r in b_records}
    pairs = [(r, by_key[json.dumps(r["key"])]) for r in a_records if json.dumps(r["key"]) in by_key]
    if not pairs:
        raise ToolboxError(f"{path_a} and {path_b} have no item in common")
    for ra, rb in pairs:
        _same_item(ra, rb, path_b)
    names = [m for m in pairs[0][0]["metrics"] if m in pairs[0][1]["metrics"]]
    if not names:
        raise ToolboxError(f"{path_a} and {path_b} have no metric in common")
    left, right = [a for a, _ in pairs], [b for _, b in pairs]
    metrics = {}
    for name in names:
        agg = aggregate_for(name)
        p = paired_bootstrap(agg, _rows(agg, left), _rows(agg, right),
                             [r["metrics"][name] for r in left], [r["metrics"][name] for r in right], resamples, seed)
        metrics[name] = {"a": p.a, "b": p.b, "diff": p.diff, "ci95": [p.low, p.high], "wins": p.wins, "ties": p.ties,
                         "losses": p.losses, "higher_is_better": agg.higher_is_better}
    return {"a": path_a, "b": path_b, "items": len(pairs), "only_in_a": len(a_records) - len(pairs),
            "only_in_b": len(b_records) - len(pairs), "bootstrap": {"resamples": resamples, "seed": seed},
            "metrics": metrics}


def print_compare(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    console.print(f"A = {result['a']}\nB = {result['b']}", markup=False)
    extra = [f"{result[k]} only in {k[-1].upper()}" for k in ("only_in_a", "only_in_b") if result[k]]
    left_out = f" ({', '.join(extra)}, left out)" if extra else ""
    console.print(f"{result['items']} items in both{left_out}", markup=False)
    table = Table(show_edge=False)
    for col in ("metric", "A", "B", "B - A", "95% CI", "B wins", "ties", "B loses"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for name, m in result["metrics"].items():
        lo, hi = m["ci95"]
        table.add_row(name, _fmt(m["a"]), _fmt(m["b"]), _fmt(m["diff"]), f"{_fmt(lo)} – {_fmt(hi)}",
                      str(m["wins"]), str(m["ties"]), str(m["losses"]))
    console.print(table)
