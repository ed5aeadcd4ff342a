"""What a training run shows and records: a progress bar, one row per evaluation, a JSONL log.

The bar (stderr) shows step, loss, tokens/s and time left; each evaluation prints a line
as it happens and becomes a row of the table printed at the end; every log event of the
Trainer (training loss, learning rate, evaluation metrics) is one line of
``metrics.jsonl`` in the output directory. Imported by `toolbox.finetune.train` only.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from transformers import TrainerCallback

# metric -> column title, in table order
COLUMNS = {
    "loss": "train loss",
    "eval_loss": "eval loss",
    "eval_perplexity": "perplexity",
    "eval_accuracy": "accuracy",
    "eval_macro_f1": "macro-F1",
    "eval_precision": "precision",
    "eval_recall": "recall",
    "eval_f1": "F1",
}


class RunLog(TrainerCallback):
    """Progress bar, per-evaluation rows and the JSONL log of one run."""

    def __init__(self, log_path: Path, perplexity: bool, console: Console | None = None, resumed_step: int = 0):
        self.log_path = log_path
        self.perplexity = perplexity  # language models: eval loss also as perplexity
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.rows: list[dict] = []
        self.last_loss: float | None = None
        self.progress: Progress | None = None
        self.task = None
        self._start_time = 0.0
        self._start_tokens = 0
        if resumed_step:  # keep the log of the steps the checkpoint holds, drop the rest
            kept = [line for line in _lines(log_path) if json.loads(line).get("step", 0) <= resumed_step]
            log_path.write_text("".join(kept), encoding="utf-8")
            self.rows = [r for r in map(json.loads, kept) if "eval_loss" in r]

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tokens/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="-", speed="-")
        self._start_time, self._start_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._start_time
        speed = (state.num_input_tokens_seen - self._start_tokens) / elapsed if elapsed > 0 else 0.0
        loss = "-" if self.last_loss is None else f"{self.last_loss:.4f}"
        self.progress.update(self.task, completed=state.global_step, loss=loss, speed=f"{speed:,.0f}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" in logs:
            self.last_loss = logs["loss"]
        if self.perplexity and "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 700))
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        self.append(record)
        if "eval_loss" in logs:
            record["loss"] = self.last_loss
            self.rows.append(record)
            shown = ", ".join(f"{COLUMNS[k]} {_fmt(record[k])}" for k in COLUMNS if record.get(k) is not None)
            self.console.print(f"epoch {record['epoch']:g} (step {record['step']}): {shown}")

    def append(self, record: dict) -> None:
        """One line of the JSONL log."""
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()

    def table(self) -> Table:
        """One row per evaluation: epoch, step, and the metrics the run has."""
        keys = [k for k in COLUMNS if any(r.get(k) is not None for r in self.rows)]
        table = Table("epoch", "step", *(COLUMNS[k] for k in keys))
        for r in self.rows:
            table.add_row(f"{r['epoch']:g}", str(r["step"]), *(_fmt(r.get(k)) for k in keys))
        return table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
