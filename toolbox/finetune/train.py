"""One training run of `toolbox finetune`: transformers' Trainer, with peft's LoRA by default.

The base model is loaded by transformers' GPT-NeoX classes from its checkpoint directory
(the causal LM for `lm`, the sequence / token classification models for `classify` and
`tag`, whose new head peft trains in full beside the adapters). Data come from
`toolbox.finetune.data`, already tokenized by sentencepiece.

The output directory holds, while training, ``run.json`` (the settings and the data
fingerprint a ``--resume`` must match), ``metrics.jsonl`` and ``checkpoints/`` (the
Trainer's: weights, optimizer, scheduler and RNG states); at the end, the model in the
Hugging Face layout (LoRA merged into the weights), the tokenizer files and the model card.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolbox.errors import ToolboxError
from toolbox.finetune.data import IGNORE, DataSpec, Encoded, encode, load_records

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
LOG_FILE = "metrics.jsonl"
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
BEST_METRIC = {"classify": ("macro_f1", True), "tag": ("f1", True), "lm": ("loss", False)}
# settings that do not change what a run computes (a --resume may differ in these)
RUNTIME_ONLY = {"output", "resume", "overwrite", "keep_checkpoints", "threads", "tensorboard", "device"}
INSTALL_HINT = "pip install 'rinna-toolbox[train]'"
BODY_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # every Linear of a GPT-NeoX layer


@dataclass(frozen=True)
class TrainSettings:
    """Method and schedule of one run (the CLI's options)."""

    task: str
    output: Path
    model: str | None = None
    revision: str | None = None
    full: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()  # () = BODY_LINEARS
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float | None = None  # LoRA 2e-4, full 2e-5
    schedule: str = "linear"
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_length: int | None = None  # default: the model's context, at most 1024
    patience: int | None = None
    seed: int = 0
    save_steps: int | None = None
    save_total_limit: int = 2
    device: str | None = None
    bf16: bool | None = None  # None: on CUDA when supported
    gradient_checkpointing: bool | None = None  # None: on CUDA
    save_dtype: str = "auto"
    tensorboard: bool = False
    keep_checkpoints: bool = False
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (2e-5 if self.full else 2e-4)


@dataclass
class Result:
    """What a finished run produced."""

    output: Path
    final: dict
    history: list[dict]
    stats: dict
    table: object = None  # rich Table of the evaluations
    notes: list[str] = field(default_factory=list)


def run(settings: TrainSettings, data: DataSpec, callbacks=(), console=None) -> Result:
    """Train, evaluate each epoch, export; raises ToolboxError for any bad input or a failed run."""
    from toolbox.checkpoints import checkpoint_dir, parse_model
    from toolbox.tokenizer import Tokenizer

    _check_settings(settings)
    ref = parse_model(settings.model, settings.revision)
    base = checkpoint_dir(ref)
    base_config = _read_json(base / "config.json")
    tokenizer = Tokenizer(base / "spiece.model")
    context = int(base_config.get("max_position_embeddings", 2048))
    max_length = settings.max_length or min(context, 1024)
    if max_length > context:
        raise ToolboxError(f"--max-length {max_length} exceeds the model's context of {context}")
    if settings.task != "lm" and "pad" not in tokenizer.special_ids:
        raise ToolboxError(f"{base / 'spiece.model'} defines no pad token, which batching needs")

    records = load_records(settings.task, data)
    encoded = encode(records, tokenizer, max_length)
    fingerprint = records.fingerprint()
    if settings.patience is not None and not encoded.eval:
        raise ToolboxError("--patience needs evaluation data (--eval, --eval-split or --eval-fraction > 0)")

    out = Path(settings.output)
    identity = {"settings": _identity(settings, max_length), "base": ref.name, "fingerprint": fingerprint}
    checkpoint = _check_output(out, identity, settings)

    try:
        import peft  # noqa: F401
        import torch
        import transformers
    except ImportError as exc:
        raise ToolboxError(f"toolbox finetune needs {exc.name}: {INSTALL_HINT}") from None
    if settings.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ToolboxError("--tensorboard needs tensorboard: pip install tensorboard") from None

    with _quiet(transformers):
        return _train(settings, records, encoded, ref, base, base_config, tokenizer, identity, checkpoint,
                      callbacks, console, torch, transformers)


def _train(settings, records, encoded, ref, base, base_config, tokenizer, identity, checkpoint, callbacks, console,
           torch, transformers) -> Result:
    """The part of `run` that needs torch: model, Trainer, training, export."""
    from toolbox.finetune.progress import RunLog

    out = Path(settings.output)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = _device(settings.device, torch)
    on_cuda = device == "cuda"
    bf16 = settings.bf16 if settings.bf16 is not None else on_cuda and torch.cuda.is_bf16_supported()
    if bf16 and not on_cuda:
        raise ToolboxError("--bf16 needs a CUDA device (training on the CPU runs in float32)")
    checkpointing = settings.gradient_checkpointing if settings.gradient_checkpointing is not None else on_cuda
    if checkpoint is None:  # a new run (or a resumed one that had saved nothing): start from a clean directory
        _start_output(out, identity, clear=settings.overwrite or settings.resume)

    transformers.set_seed(settings.seed)
    model = _load_model(settings, base, encoded, tokenizer, torch.bfloat16 if bf16 and not settings.full else None)
    resumed_step = _checkpoint_step(checkpoint) if checkpoint else 0
    log = RunLog(out / LOG_FILE, settings.task == "lm", console=console, resumed_step=resumed_step)
    trainer = _trainer(settings, model, encoded, tokenizer, out, bf16, checkpointing, on_cuda, resumed_step, log,
                       callbacks)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - any failure: say where the run can resume
        log.on_train_end(None, None, None)
        last = last_checkpoint(out / CHECKPOINTS)
        where = (f"the last checkpoint ({last.name}) is kept: rerun with --resume to continue from it"
                 if last else "no checkpoint was saved yet")
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ToolboxError(f"training stopped at step {trainer.state.global_step} ({what}); {where}") from None

    final = _final_metrics(trainer, log) if encoded.eval else {}
    notes = _notes(records, encoded)
    _export(settings, trainer, base, base_config, ref, out, records, encoded, identity["fingerprint"], final, log,
            notes, torch)
    if not settings.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return Result(out, final, log.rows, encoded.stats, log.table(), notes)


@contextmanager
def _quiet(transformers):
    """transformers' info logs, progress bars and deprecation warnings off while the run log reports."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


# -- checks and the output directory ------------------------------------------------


def _check_settings(s: TrainSettings) -> None:
    if s.task not in ("classify", "tag", "lm"):
        raise ToolboxError(f"unknown task {s.task!r}")
    if s.schedule not in SCHEDULES:
        raise ToolboxError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {s.schedule!r}")
    if s.save_dtype not in SAVE_DTYPES:
        raise ToolboxError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {s.save_dtype!r}")
    if not 0 <= s.warmup < 1:
        raise ToolboxError(f"--warmup is a fraction of the steps in [0, 1), got {s.warmup}")
    if s.patience is not None and s.save_steps is not None:
        raise ToolboxError("--patience compares epoch-end checkpoints: drop --save-steps")
    if s.resume and s.overwrite:
        raise ToolboxError("--resume and --overwrite exclude each other")


def _identity(s: TrainSettings, max_length: int) -> dict:
    d = {k: v for k, v in asdict(s).items() if k not in RUNTIME_ONLY}
    d["lora_targets"] = list(s.lora_targets)
    d["max_length"] = max_length
    d["learning_rate"] = s.lr
    return d


def _check_output(out: Path, identity: dict, s: TrainSettings) -> Path | None:
    """Check the output directory; with --resume, the checkpoint to resume from (None: start from the beginning)."""
    run_file = out / RUN_FILE
    if s.resume:
        if not run_file.is_file():
            raise ToolboxError(f"{out}: nothing to resume (no {RUN_FILE} of an earlier run)")
        before = _read_json(run_file)
        if (out / "config.json").is_file():
            raise ToolboxError(f"{out}: that run has finished (its model is written); nothing to resume")
        for key in ("base", "fingerprint"):
            if before.get(key) != identity[key]:
                what = "base model" if key == "base" else "data (fingerprint)"
                raise ToolboxError(f"--resume: the {what} differs from the run in {out}")
        for key, value in identity["settings"].items():
            if before.get("settings", {}).get(key) != value:
                raise ToolboxError(f"--resume: setting {key} is {value!r} here but "
                                   f"{before.get('settings', {}).get(key)!r} in the run in {out}")
        return last_checkpoint(out / CHECKPOINTS)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not s.overwrite:
            raise ToolboxError(f"{out} is not empty: --resume continues the run in it, --overwrite starts over")
        if not run_file.is_file():
            raise ToolboxError(f"{out} holds files that toolbox finetune did not write; choose another directory")
    return None


def _start_output(out: Path, identity: dict, clear: bool) -> None:
    """A fresh output directory holding the run's identity; `clear` removes an earlier run's files."""
    if out.exists() and clear:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(identity, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def last_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint: ``trainer_state.json`` is the Trainer's last write to one,
    so a checkpoint cut short by a crash is passed over."""
    if not directory.is_dir():
        return None
    done = [p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=_checkpoint_step, default=None)


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ToolboxError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ToolboxError(f"{path}: expected a JSON object")
    return data


def _device(name: str | None, torch) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ToolboxError(f"--device {name}: no CUDA device is available")
        return "cuda"
    raise ToolboxError(f"--device must be cpu or cuda, got {name!r}")


# -- model and trainer --------------------------------------------------------------


def _load_model(s: TrainSettings, base: Path, encoded: Encoded, tokenizer, dtype):
    """The transformers model for the task, with LoRA adapters unless --full."""
    import torch
    from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification, GPTNeoXForTokenClassification

    kwargs = {"dtype": dtype or torch.float32}
    if s.task == "lm":
        cls = GPTNeoXForCausalLM
    else:
        names = encoded.label_names
        cls = GPTNeoXForSequenceClassification if s.task == "classify" else GPTNeoXForTokenClassification
        kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)}, pad_token_id=tokenizer.special_ids["pad"])
        if s.task == "classify":
            kwargs["problem_type"] = "single_label_classification"
    try:
        model = cls.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as exc:
        raise ToolboxError(f"cannot load {base} with transformers: {str(exc).splitlines()[0]}") from None
    if s.full:
        return model
    from peft import LoraConfig, get_peft_model

    task_type = {"classify": "SEQ_CLS", "tag": "TOKEN_CLS", "lm": "CAUSAL_LM"}[s.task]
    config = LoraConfig(task_type=task_type, r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                        target_modules=list(s.lora_targets or BODY_LINEARS))
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise ToolboxError(f"--lora-targets: {str(exc).splitlines()[0]}") from None
    for p in model.parameters():  # trained weights (adapters, the new head) in float32 under bf16 autocast
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


class Collator:
    """Right-pads a batch: pad id for inputs, IGNORE for per-token labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], int):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        else:
            batch["labels"] = torch.full((len(features), width), IGNORE, dtype=torch.long)
            for i, row in enumerate(labels):
                batch["labels"][i, : len(row)] = torch.tensor(row)
        return batch


def _trainer(s: TrainSettings, model, encoded: Encoded, tokenizer, out: Path, bf16: bool, checkpointing: bool,
             on_cuda: bool, resumed_step: int, log, callbacks):
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments

    has_eval = bool(encoded.eval)
    steps_per_epoch = math.ceil(len(encoded.train) / s.batch_size / s.grad_accum)
    metric, greater = BEST_METRIC[s.task]
    extra = [EarlyStoppingCallback(early_stopping_patience=s.patience)] if s.patience is not None else []
    if s.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        extra.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "tensorboard"))))
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=s.epochs,
        max_steps=s.max_steps or -1,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr,
        lr_scheduler_type=s.schedule,
        warmup_steps=s.warmup,
        weight_decay=s.weight_decay,
        bf16=bf16,
        gradient_checkpointing=checkpointing,  # (transformers 5.2x: a deprecated alias of activation_checkpointing)
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        eval_strategy="epoch" if has_eval else "no",
        eval_on_start=has_eval and not resumed_step,
        prediction_loss_only=s.task == "lm",
        save_strategy="steps" if s.save_steps else "epoch",
        save_steps=s.save_steps or 500,
        save_total_limit=s.save_total_limit,
        load_best_model_at_end=s.patience is not None,
        metric_for_best_model=metric if s.patience is not None else None,
        greater_is_better=greater if s.patience is not None else None,
        logging_strategy="steps",
        logging_steps=max(1, min(50, steps_per_epoch // 10)),
        include_num_input_tokens_seen="non_padding",
        seed=s.seed,
        use_cpu=not on_cuda,
        dataloader_pin_memory=on_cuda,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encoded.train,
        eval_dataset=encoded.eval or None,
        data_collator=Collator(tokenizer.special_ids.get("pad", 0)),
        compute_metrics=_metrics_fn(s.task, encoded) if has_eval and s.task != "lm" else None,
        callbacks=[log, *extra, *callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # the run log shows progress and metrics instead
    return trainer


# -- metrics ------------------------------------------------------------------------


def _final_metrics(trainer, log) -> dict:
    """Metrics of the model as exported: the last evaluation's when it saw the final weights, else a new one
    (early stopping went back to the best checkpoint, or --max-steps ended mid-epoch)."""
    last = log.rows[-1] if log.rows else None
    if last is None or last["step"] != trainer.state.global_step or trainer.args.load_best_model_at_end:
        trainer.remove_callback(log)
        last = {**trainer.evaluate(), "step": trainer.state.global_step, "final": True}
        if log.perplexity:
            last["eval_perplexity"] = math.exp(min(last["eval_loss"], 700))
        log.append(last)
    return {k: v for k, v in last.items() if k.startswith("eval_") and isinstance(v, float)
            and not k.endswith(("_runtime", "_per_second"))}



def _metrics_fn(task: str, encoded: Encoded):
    import numpy as np

    if task == "classify":
        from sklearn.metrics import accuracy_score, f1_score

        def classify_metrics(p):
            preds, labels = np.asarray(p.predictions).argmax(-1), np.asarray(p.label_ids)
            return {"accuracy": float(accuracy_score(labels, preds)),
                    "macro_f1": float(f1_score(labels, preds, labels=list(range(len(encoded.label_names))),
                                               average="macro", zero_division=0))}

        return classify_metrics

    def tag_metrics(p):
        logits = np.asarray(p.predictions)
        gold, pred = [], []
        for i, (text, spans, units, entities) in enumerate(encoded.eval_meta):
            ids = logits[i, : len(spans)].argmax(-1).tolist()
            found = entity_spans(text, spans, [encoded.label_names[j] for j in ids])
            gold.append(unit_tags(text, units, entities))
            pred.append(unit_tags(text, units, found))
        return entity_scores(gold, pred)

    return tag_metrics


def entity_spans(text: str, spans, labels: list[str]) -> list[tuple[int, int, str]]:
    """Predicted entities as (start, end, type), decoded as `toolbox tag` decodes them."""
    from toolbox.heads import decode_entities

    return [(e.start, e.end, e.label) for e in decode_entities(text, spans, labels, [1.0] * len(labels))]


def unit_tags(text: str, units, entities) -> list[str]:
    """IOB2 tags of the units (the words of a words + tags record, else the characters) for `entities`.

    A unit overlapping an entity is inside it; the first such unit is B-.
    """
    units = units if units is not None else [(i, i + 1) for i in range(len(text))]
    tags = ["O"] * len(units)
    for start, end, label in entities:
        inside = [j for j, (s, e) in enumerate(units) if s < end and e > start and tags[j] == "O"]
        for k, j in enumerate(inside):
            tags[j] = f"{'B' if k == 0 else 'I'}-{label}"
    return tags


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level precision, recall and F1 (seqeval: an entity counts when its type and span match)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {"precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0)),
            "f1": float(f1_score(gold, pred, zero_division=0))}


# -- export -------------------------------------------------------------------------


def _notes(records, encoded: Encoded) -> list[str]:
    notes = []
    if records.skipped.total:
        notes.append(records.skipped.summary())
    st = encoded.stats
    if st.get("truncated"):
        notes.append(f"{st['truncated']} record(s) longer than --max-length were cut")
    if st.get("dropped_no_room_for_response"):
        notes.append(f"{st['dropped_no_room_for_response']} instruction record(s) left no room for the response "
                     "and were dropped")
    if st.get("misaligned_entities"):
        notes.append(f"{st['misaligned_entities']} of {st['entities']} entities do not start and end on "
                     "sentencepiece piece boundaries; they were learnt with the whole pieces")
    return notes


def _export(s, trainer, base: Path, base_config: dict, ref, out: Path, records, encoded, fingerprint, final, log,
            notes, torch) -> None:
    """The merged model, tokenizer files, LoRA adapter (for reference) and model card into `out`."""
    from toolbox.finetune.card import CardInfo, render

    model = trainer.model
    if not s.full:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    stored = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    dtype_name = stored if s.save_dtype == "auto" else s.save_dtype
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name,
                                                                                                 torch.float32)
    model = model.to(dtype)
    model.config.use_cache = True  # the Trainer turns it off; generation wants it
    instruction = s.task == "lm" and any("instruction" in r for r in records.train)
    model.config.toolbox = {"task": s.task, "base_model": ref.name,
                            "prompt_format": "rinna-chat" if instruction else "plain"}
    model.save_pretrained(out)
    shutil.copyfile(base / "spiece.model", out / "spiece.model")
    _tokenizer_files(base, out)
    info = CardInfo(
        task=s.task, directory=out.name, base_model=ref.name, base_repo=ref.repo_id,
        method="full fine-tuning" if s.full else "LoRA", labels=list(records.labels), sources=records.sources,
        counts={"train": len(encoded.train), "eval": len(encoded.eval)}, fingerprint=fingerprint,
        settings=_card_settings(s, trainer, dtype_name, encoded.stats["max_length"]), final=final,
        history=log.rows, notes=notes, instruction=instruction)
    (out / "README.md").write_text(render(info), encoding="utf-8")


def _tokenizer_files(base: Path, out: Path) -> None:
    """transformers' tokenizer files: written from spiece.model when the toolbox has the writer, else copied."""
    try:
        from toolbox.hf_tokenizer import write_tokenizer_files
    except ImportError:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (base / name).is_file():
                shutil.copyfile(base / name, out / name)
        return
    write_tokenizer_files(out, out / "spiece.model")


def _card_settings(s: TrainSettings, trainer, dtype_name: str, max_length: int) -> dict:
    args = trainer.args
    settings = {"method": "full fine-tuning" if s.full else f"LoRA r={s.lora_r} alpha={s.lora_alpha} "
                f"dropout={s.lora_dropout} on {', '.join(s.lora_targets or BODY_LINEARS)} (merged)",
                "epochs": f"{s.epochs:g}" + (f" (max {s.max_steps} steps)" if s.max_steps else ""),
                "steps": trainer.state.global_step,
                "batch size": f"{s.batch_size} x {s.grad_accum} accumulation",
                "learning rate": f"{s.lr:g}, {s.schedule} schedule, warmup {s.warmup:g}",
                "weight decay": f"{s.weight_decay:g}", "max length": f"{max_length} tokens",
                "seed": s.seed, "precision": "bf16 autocast" if args.bf16 else "float32",
                "gradient checkpointing": bool(args.gradient_checkpointing), "saved dtype": dtype_name}
    if s.patience is not None:
        settings["early stopping"] = f"patience {s.patience} on {BEST_METRIC[s.task][0]}, best model kept"
    return settings
