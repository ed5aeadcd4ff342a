"""Fine-tuning throughput and memory: `toolbox finetune lm` against a plain Trainer + peft script.

    python bench/finetune.py [--steps 20] [--batch-size 8] [--seq 128] [--models embedded,mid]
                             [--methods lora,full] [--runs 2] [--threads 1]

Both sides train the same causal LM on the same token blocks: lines of the source text
(default ../shared/data/wagahaiwa_nekodearu.txt, else tests/data/finetune/neko.txt),
each encoded by sentencepiece and ended by </s>, joined and cut into --seq-token blocks.

  toolbox  `toolbox.finetune.train.run` (task lm, --max-steps, no evaluation): the
           command's own data checks, collator, callbacks and checkpointing
  plain    the usual recipe: GPTNeoXForCausalLM.from_pretrained, peft's get_peft_model
           (same r / alpha / dropout / target modules), Trainer with the same batch
           size, learning rate, schedule, warmup and seed, default_data_collator,
           no checkpoints

on the embedded model and a mid-size random GPT-NeoX (hidden 512, 8 layers, vocab 8000,
float32 weights). Each run is a process of its own: peak memory is its maximum resident
set, and speed is the training tokens of the steps after the first --skip steps over the
process CPU time they took (a Trainer callback on both sides; wall-clock tokens/s are
recorded too). CPU time, with one thread by default, is what a busy shared machine
leaves least disturbed: wall time there swung 2x between identical runs. Target: toolbox
at least as fast as plain, and no more memory.

Results go to bench/results/finetune.json.
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
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "wagahaiwa_nekodearu.txt"
FALLBACK_SOURCE = ROOT / "tests" / "data" / "finetune" / "neko.txt"
EMBEDDED = ROOT / "toolbox" / "data" / "embedded"
MID_SHAPE = dict(vocab_size=8000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                 intermediate_size=2048, max_position_embeddings=512, bos_token_id=2, eos_token_id=3,
                 pad_token_id=0, tie_word_embeddings=False, rotary_pct=1.0)
LR = {"lora": 2e-4, "full": 2e-5}
KEY = "tokens_per_cpu_s"  # compared: training tokens per second of process CPU time


def timer_callback(skip: int):
    """A TrainerCallback measuring tokens/s over the steps after the first `skip`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.start = self.tokens0 = None
            self.result = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == skip:
                self.start, self.cpu0 = time.perf_counter(), time.process_time()
                self.tokens0 = state.num_input_tokens_seen
            elif state.global_step == state.max_steps and self.start is not None:
                seconds, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu0
                tokens = state.num_input_tokens_seen - self.tokens0
                self.result = {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu,
                               "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu,
                               "steps": state.global_step - skip}

    return Timer()


def lines(source: Path, limit: int) -> list[str]:
    text = source.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [line for line in text.split("\n") if line.strip()][:limit]


def worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    timer = timer_callback(a.skip)
    out = Path(a.tmp) / f"{a.impl}-{a.method}-{a.model_name}"
    texts = lines(Path(a.source), a.lines)
    if a.impl == "toolbox":
        from toolbox.finetune.data import DataSpec
        from toolbox.finetune.train import TrainSettings, run

        data = Path(a.tmp) / "train.jsonl"
        if not data.exists():
            data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                            encoding="utf-8")
        settings = TrainSettings(task="lm", output=out, model=a.model, full=a.method == "full", max_steps=a.steps,
                                 batch_size=a.batch_size, learning_rate=LR[a.method], max_length=a.seq,
                                 device="cpu", overwrite=True, save_dtype="float32")
        run(settings, DataSpec(train=str(data), eval_fraction=0), callbacks=[timer])
    else:
        plain(a, texts, out, timer)
    return timer.result


def plain(a, texts: list[str], out: Path, timer) -> None:
    """The common Trainer + peft recipe, written out as a user would."""
    import sentencepiece as spm
    import torch
    from transformers import GPTNeoXForCausalLM, Trainer, TrainingArguments, default_data_collator

    sp = spm.SentencePieceProcessor(model_file=str(Path(a.model) / "spiece.model"))
    stream = [i for t in texts for i in sp.encode(t) + [sp.eos_id()]]
    blocks = [stream[i : i + a.seq] for i in range(0, len(stream) - a.seq + 1, a.seq)]
    dataset = [{"input_ids": b, "attention_mask": [1] * len(b), "labels": b} for b in blocks]
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    if a.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=["query_key_value", "dense", "dense_h_to_4h",
                                                                 "dense_4h_to_h"]))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                             learning_rate=LR[a.method], lr_scheduler_type="linear", warmup_steps=0.05, seed=0,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             include_num_input_tokens_seen="non_padding", logging_steps=10)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
            callbacks=[timer]).train()


def build_mid(directory: Path) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(**MID_SHAPE)).save_pretrained(directory)
    shutil.copy(EMBEDDED / "spiece.model", directory / "spiece.model")
    return directory


def measure(a, impl: str, method: str, name: str, model: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--method", method, "--model", str(model),
           "--model-name", name, "--tmp", a.tmp, "--source", str(a.source), "--steps", str(a.steps),
           "--skip", str(a.skip), "--batch-size", str(a.batch_size), "--seq", str(a.seq),
           "--lines", str(a.lines), "--threads", str(a.threads)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)  # the worker reports its peak
    stdout, stderr = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"{impl} {method} {name} failed:\n{stderr.decode()[-3000:]}")
    return json.loads(stdout.decode().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3, help="First steps left out of the timing (warm-up).")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lines", type=int, default=4000, help="Source lines to use.")
    ap.add_argument("--models", default="embedded,mid")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--runs", type=int, default=2, help="Repeats of each case (the best is kept).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE if DEFAULT_SOURCE.exists() else FALLBACK_SOURCE)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune.json")
    ap.add_argument("--worker", choices=["toolbox", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--model-name", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.impl = a.worker
        result = worker(a)
        import resource

        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        a.tmp = tmp
        models = {"embedded": EMBEDDED}
        if "mid" in a.models.split(","):
            models["mid"] = build_mid(Path(tmp) / "mid-model")
        rows = []
        for name in a.models.split(","):
            for method in a.methods.split(","):
                best = {}
                for _ in range(a.runs):
                    for impl in ("toolbox", "plain"):  # interleaved, so load on a shared machine hits both
                        r = measure(a, impl, method, name, models[name])
                        if impl not in best or r[KEY] > best[impl][KEY]:
                            best[impl] = r
                ours, theirs = best["toolbox"], best["plain"]
                rows.append({"model": name, "method": method, "toolbox": ours, "plain": theirs,
                             "speed_ratio": ours[KEY] / theirs[KEY],
                             "wall_speed_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
                             "memory_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"]})
                print(f"{name:9s} {method:5s} toolbox {ours[KEY]:7.0f} tok/cpu-s ({ours['tokens_per_s']:5.0f} wall) "
                      f"{ours['peak_rss_mib']:6.0f} MiB | plain {theirs[KEY]:7.0f} tok/cpu-s "
                      f"({theirs['tokens_per_s']:5.0f} wall) {theirs['peak_rss_mib']:6.0f} MiB"
                      f" | speed x{rows[-1]['speed_ratio']:.2f} memory x{rows[-1]['memory_ratio']:.2f}", flush=True)
    import torch
    import transformers

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {k: getattr(a, k) for k in ("steps", "skip", "batch_size", "seq", "threads", "runs")}
        | {"source": str(a.source), "lr": LR},
        "results": rows,
    }
    a.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
