"""The model card (README.md) of a fine-tuned model: what it was made from, how, and how well it does."""

from __future__ import annotations

from dataclasses import dataclass, field

PIPELINES = {"classify": "text-classification", "tag": "token-classification", "lm": "text-generation"}
USAGE = {
    "classify": 'toolbox classify --model {dir} "今日はとても楽しかった。"',
    "tag": 'toolbox tag --model {dir} "山田さんは京都へ行った。"',
    "lm": 'toolbox generate --model {dir} "吾輩は猫である。"',
}
METRICS = {
    "eval_loss": "loss",
    "eval_perplexity": "perplexity",
    "eval_accuracy": "accuracy",
    "eval_macro_f1": "macro-F1",
    "eval_precision": "precision (entity level)",
    "eval_recall": "recall (entity level)",
    "eval_f1": "F1 (entity level)",
}


@dataclass
class CardInfo:
    """Everything the card states."""

    task: str
    directory: str
    base_model: str
    base_repo: str | None  # hub id, for the card's metadata
    method: str  # "LoRA" or "full fine-tuning"
    labels: list[str]
    sources: dict[str, str]
    counts: dict[str, int]
    fingerprint: str
    settings: dict
    final: dict
    history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    instruction: bool = False


def render(info: CardInfo) -> str:
    """The card's markdown (with Hugging Face metadata front matter)."""
    tags = ["rinna-toolbox", "gpt-neox", "japanese"] + (["lora"] if info.method == "LoRA" else [])
    front = ["---", "library_name: transformers", f"pipeline_tag: {PIPELINES[info.task]}", "language:", "- ja"]
    if info.base_repo:
        front.append(f"base_model: {info.base_repo}")
    front += ["tags:", *(f"- {t}" for t in tags), "---", ""]
    what = {"classify": "text classification", "tag": "named-entity tagging",
            "lm": "instruction following" if info.instruction else "language modelling"}[info.task]
    out = [*front, f"# {info.directory}", "",
           f"A {what} model: **{info.base_model}** adapted with {info.method} by "
           f"`toolbox finetune {info.task}`.", "", "## Use", "", "```sh",
           USAGE[info.task].format(dir=info.directory), "```", ""]
    if info.task == "lm" and info.instruction:
        out += ["Trained on the series' instruction template (`ユーザー: ...<NL>システム: `): "
                "prompt it with `--prompt-format rinna-chat`.", ""]
    if info.task != "lm":
        out += ["Inputs are tokenized by the model's sentencepiece model (`spiece.model`); "
                + ("the label is read at a `</s>` appended to the text." if info.task == "classify" else
                   "each piece is labelled (BIO); entities are returned as character spans."), ""]
    if info.labels:
        out += [f"## Labels ({len(info.labels)})", "", ", ".join(f"`{label}`" for label in info.labels), ""]
    out += ["## Data", "", "| split | source | sequences |", "|---|---|---|"]
    out += [f"| {split} | {source} | {info.counts.get(split, 0)} |" for split, source in info.sources.items()]
    out += ["", f"Data fingerprint (sha256 of the checked records): `{info.fingerprint}`", ""]
    out += [f"- {note}" for note in info.notes] + ([""] if info.notes else [])
    out += ["## Settings", "", "| setting | value |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in info.settings.items()] + [""]
    if info.final:
        out += ["## Results (held-out data)", "", "| metric | value |", "|---|---|"]
        out += [f"| {label} | {info.final[key]:.4f} |" for key, label in METRICS.items() if key in info.final] + [""]
    if info.history:
        keys = [k for k in METRICS if any(k in row for row in info.history)]
        out += ["Per evaluation:", "", "| epoch | step | " + " | ".join(METRICS[k] for k in keys) + " |",
                "|---|---|" + "---|" * len(keys)]
        for row in info.history:
            cells = [f"{row[k]:.4f}" if row.get(k) is not None else "-" for k in keys]
            out.append(f"| {row['epoch']:g} | {row['step']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
