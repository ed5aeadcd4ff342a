"""`toolbox finetune classify|tag|lm`: adapt a series model to your data."""

from __future__ import annotations

from pathlib import Path

import click

from toolbox.commands.options import model_options


def _options(func, options):
    for option in reversed(options):
        func = option(func)
    return func


def data_options(func):
    """--train/--eval and the ways to hold out evaluation data, --skip-invalid."""
    return _options(func, [
        click.option("--train", "train", required=True, metavar="PATH|NAME",
                     help="Training data: .jsonl/.json/.csv/.tsv/.parquet, or a Hugging Face dataset "
                          "(name or directory)."),
        click.option("--eval", "eval_", metavar="PATH|NAME", help="Evaluation data (same formats)."),
        click.option("--train-split", default="train", show_default=True, help="Split of a dataset to train on."),
        click.option("--eval-split", help="Split of the --train dataset to evaluate on (e.g. validation)."),
        click.option("--eval-fraction", type=float,
                     help="Hold out this fraction of the training records [default: 0.1 without --eval/--eval-split; "
                          "0 = no evaluation]."),
        click.option("--dataset-config", help="Configuration (subset) name of a Hugging Face dataset."),
        click.option("--skip-invalid", is_flag=True,
                     help="Skip and count bad records instead of stopping at the first."),
    ])


def method_options(func):
    """Model, LoRA or full, schedule, checkpoints, device."""
    return _options(func, [
        click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Output directory (the fine-tuned model, its card, log and checkpoints)."),
        click.option("--full", is_flag=True, help="Full fine-tuning instead of LoRA."),
        click.option("--lora-r", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank."),
        click.option("--lora-alpha", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA alpha."),
        click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
                     help="Dropout on the LoRA input."),
        click.option("--lora-targets", default="", help="Comma-separated module names to adapt [default: every Linear "
                     "of the body, e.g. query_key_value,dense,dense_h_to_4h,dense_4h_to_h]."),
        click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True),
        click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many optimizer steps."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Sequences per device step."),
        click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Steps accumulated per optimizer step."),
        click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True),
                     help="Peak learning rate [default: 2e-4 LoRA, 2e-5 full]."),
        click.option("--schedule", type=click.Choice(["linear", "cosine", "constant", "constant_with_warmup"]),
                     default="linear", show_default=True, help="Learning-rate schedule after warmup."),
        click.option("--warmup", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
                     help="Warmup as a fraction of the steps."),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True),
        click.option("--max-length", type=click.IntRange(min=2),
                     help="Tokens per sequence at most [default: the model's context, at most 1024]."),
        click.option("--patience", type=click.IntRange(min=1),
                     help="Early stopping: stop after this many evaluations without improvement; keep the best."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--save-steps", type=click.IntRange(min=1),
                     help="Checkpoint every N steps [default: at each epoch's end]."),
        click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint."),
        click.option("--overwrite", is_flag=True, help="Start over in an --output of an earlier run."),
        click.option("--keep-checkpoints", is_flag=True, help="Keep the checkpoints after a finished run."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--bf16/--no-bf16", default=None, help="bfloat16 autocast [default: on CUDA when supported]."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     help="Recompute activations in the backward pass [default: on CUDA]."),
        click.option("--save-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                     show_default=True, help="dtype of the saved weights (auto: the base checkpoint's)."),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads."),
        click.option("--tensorboard", is_flag=True, help="Also log to TensorBoard (in OUTPUT/tensorboard)."),
    ])


def _run(task: str, opts: dict, fields: dict, labels: str | None = None, word_sep: str = " ") -> None:
    from rich.console import Console

    from toolbox.finetune.data import DataSpec, Fields
    from toolbox.finetune.train import TrainSettings, run

    label_set = tuple(x.strip() for x in labels.split(",") if x.strip()) if labels else None
    data = DataSpec(
        train=opts.pop("train"), eval=opts.pop("eval_"), train_split=opts.pop("train_split"),
        eval_split=opts.pop("eval_split"), eval_fraction=opts.pop("eval_fraction"),
        dataset_config=opts.pop("dataset_config"), fields=Fields(**fields), labels=label_set, word_sep=word_sep,
        skip_invalid=opts.pop("skip_invalid"),
    )
    targets = tuple(t.strip() for t in opts.pop("lora_targets").split(",") if t.strip())
    settings = TrainSettings(task=task, lora_targets=targets, **opts)
    result = run(settings, data)
    console = Console(highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}")
    if result.history:
        console.print(result.table)
    console.print(f"wrote {result.output} (model card: {result.output / 'README.md'})")


@click.group()
def finetune():
    """Fine-tune a series model on your data: classification, entity tagging, or the language model itself.

    LoRA by default (--full for every weight). Evaluation each epoch on held-out data,
    checkpoints to --resume from, and a Hugging Face layout directory at the end, with a
    model card. See docs/finetune.md.
    """


@finetune.command()
@data_options
@click.option("--text-field", default="text", show_default=True)
@click.option("--label-field", default="label", show_default=True)
@click.option("--labels", help="Comma-separated label set (and order) [default: the labels found in --train].")
@method_options
@model_options
def classify(text_field, label_field, labels, **opts):
    """A sequence classification head: records with a text and a label.

    Metrics: accuracy and macro-F1. Use the result with `toolbox classify --model OUTPUT`.

    \b
    Example:
      toolbox finetune classify --train reviews.jsonl -o out/reviews --epochs 2
    """
    _run("classify", opts, {"text": text_field, "label": label_field}, labels)


@finetune.command()
@data_options
@click.option("--text-field", default="text", show_default=True, help="Text of text + entities records.")
@click.option("--entities-field", default="entities", show_default=True,
              help="Character-span entities: [{start, end, label}, ...] or [[start, end, label], ...].")
@click.option("--tokens-field", default="tokens", show_default=True, help="Words of words + tags records.")
@click.option("--tags-field", default="tags", show_default=True, help="IOB2/IOBES tags of words + tags records.")
@click.option("--word-sep", default=" ", show_default=True, help="Joins words into the text (\"\" for Japanese).")
@click.option("--labels", help="Comma-separated entity types [default: the types found in --train].")
@method_options
@model_options
def tag(text_field, entities_field, tokens_field, tags_field, word_sep, labels, **opts):
    """Named-entity tagging: text with character-span entities, or words with tags (conll2003 shape).

    Labels are learnt on sentencepiece pieces (BIO); metrics are entity-level precision,
    recall and F1 (seqeval). Use the result with `toolbox tag --model OUTPUT`.

    \b
    Example:
      toolbox finetune tag --train ner.jsonl -o out/ner
    """
    _run("tag", opts, {"text": text_field, "entities": entities_field, "tokens": tokens_field, "tags": tags_field},
         labels, word_sep)


@finetune.command()
@data_options
@click.option("--text-field", default="text", show_default=True, help="Plain text (continued pre-training).")
@click.option("--instruction-field", default="instruction", show_default=True)
@click.option("--input-field", default="input", show_default=True, help="Optional text added to the instruction.")
@click.option("--output-field", default="output", show_default=True, help="The response to learn.")
@method_options
@model_options
def lm(text_field, instruction_field, input_field, output_field, **opts):
    """The language model itself: continued pre-training on text, or instruction tuning.

    Text records are joined and cut into --max-length blocks; instruction/output records go
    through the series' template (ユーザー: ...<NL>システム: ...), with the loss on the response
    only. LoRA weights are merged, so every backend and command loads --output as a model.

    \b
    Example:
      toolbox finetune lm --train instructions.jsonl -o out/sft
      toolbox generate --model out/sft --prompt-format rinna-chat "日本の首都は？"
    """
    _run("lm", opts, {"text": text_field, "instruction": instruction_field, "input": input_field,
                      "output": output_field})
