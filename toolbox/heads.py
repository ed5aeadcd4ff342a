"""Use a fine-tuned head: classify texts, or tag entities as character spans of each text.

    >>> from toolbox import heads
    >>> model = heads.load("out/emotion")              # a `toolbox finetune classify` output
    >>> heads.classify(model, ["今日は楽しかった。"])[0].label

`load` resolves a model like every other command (registry id, hub id or directory) and
runs it on the project's own GPT-NeoX runtime (`toolbox.runtime.heads`). Texts are
tokenized by sentencepiece exactly as in training: classification reads the model's state
at the `</s>` appended to the text; tagging labels each piece, and entities come back as
character offsets into the text given. Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from toolbox.checkpoints import checkpoint_dir, parse_model
from toolbox.config import config_fields
from toolbox.errors import ToolboxError
from toolbox.tokenizer import Tokenizer

TASK_ARCHITECTURES = {
    "GPTNeoXForSequenceClassification": "classify",
    "GPTNeoXForTokenClassification": "tag",
}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Classification:
    """The predicted label of one text, its probability, and every label's probability (best first)."""

    text: str
    label: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "label": self.label, "score": self.score, "scores": self.scores}


@dataclass(frozen=True)
class Entity:
    """An entity: `text[start:end]`, its type, and the mean probability of its pieces' labels."""

    start: int
    end: int
    label: str
    text: str
    score: float

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "label": self.label, "text": self.text, "score": self.score}


@dataclass(frozen=True)
class Tagging:
    """The entities found in one text, in order."""

    text: str
    entities: list[Entity]

    def to_dict(self) -> dict:
        return {"text": self.text, "entities": [e.to_dict() for e in self.entities]}


def head_task(directory: str | Path) -> str | None:
    """"classify" or "tag" for a fine-tuned head checkpoint directory, None for anything else (no torch)."""
    archs = config_fields(directory).get("architectures")
    if not isinstance(archs, list):
        return None
    return next((TASK_ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in TASK_ARCHITECTURES), None)


class HeadRunner:
    """A loaded head model with its tokenizer: what `load` returns and `classify`/`tag` take."""

    def __init__(self, module, tokenizer: Tokenizer, name: str, batch_size: int = 16):
        self.module = module
        self.tokenizer = tokenizer
        self.name = name
        self.task: str = module.task
        self.labels: list[str] = module.labels
        self.context_length: int = module.config.max_position_embeddings
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"<HeadRunner {self.name!r} task={self.task} labels={len(self.labels)}>"

    def run(self, sequences: list[list[int]]) -> list:
        """Probabilities per sequence, in batches of similar lengths (less padding)."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out: list = [None] * len(sequences)
        for lo in range(0, len(order), self.batch_size):
            chunk = [i for i in order[lo : lo + self.batch_size] if sequences[i]]
            if chunk:
                for i, probs in zip(chunk, self.module.predict([sequences[i] for i in chunk])):
                    out[i] = probs
        return out


def load(model: str | Path | None, *, device: str | None = None, dtype: str | None = None,
         threads: int | None = None, revision: str | None = None, batch_size: int = 16) -> HeadRunner:
    """Load a `toolbox finetune classify` / `tag` output (or any transformers GPT-NeoX head checkpoint)."""
    ref = parse_model(str(model) if model is not None else None, revision)
    directory = checkpoint_dir(ref)
    if head_task(directory) is None:
        raise ToolboxError(f"{ref.name} is not a classification or tagging model (its config.json names no "
                           f"{' or '.join(TASK_ARCHITECTURES)}); make one with `toolbox finetune classify|tag`")
    import torch

    from toolbox.runtime.heads import HeadModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ToolboxError(f"device {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ToolboxError(f"device {device!r}: no CUDA device is available")
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        raise ToolboxError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    chosen = getattr(torch, dtype)
    if threads:
        torch.set_num_threads(threads)
    try:
        module = HeadModel.from_pretrained(directory, device=device, dtype=chosen)
    except (ValueError, KeyError, OSError) as exc:
        raise ToolboxError(f"cannot load {directory}: {exc}") from None
    return HeadRunner(module, Tokenizer(directory / "spiece.model"), ref.name, batch_size)


def _runner(model, task: str) -> HeadRunner:
    runner = model if isinstance(model, HeadRunner) else load(model)
    if runner.task != task:
        raise ToolboxError(f"{runner.name} is a {runner.task} model; use `toolbox {runner.task}` "
                           f"(or heads.{runner.task}) with it")
    return runner


def _texts(texts) -> tuple[list[str], bool]:
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ToolboxError(f"texts[{i}]: expected a string, got {type(text).__name__}")
    return texts, single


def _check_length(runner: HeadRunner, sequences, sources) -> None:
    for i, seq in enumerate(sequences):
        if len(seq) > runner.context_length:
            where = sources[i] if sources is not None else f"texts[{i}]"
            raise ToolboxError(f"{where}: {len(seq)} tokens exceed the model's context of {runner.context_length} "
                               "(split the text into shorter lines)")


def classify(model, texts, *, sources=None):
    """The label of each text (a `Classification`; a list for a list of texts).

    `model`: what `load` returned, or anything `load` accepts. `sources` name the texts in
    errors (default ``texts[i]``).
    """
    runner = _runner(model, "classify")
    texts, single = _texts(texts)
    eos = runner.tokenizer.special_ids.get("eos")
    sequences = runner.tokenizer.encode_batch(texts, eos=eos is not None)
    _check_length(runner, sequences, sources)
    out = []
    for text, probs in zip(texts, runner.run(sequences)):
        ranked = sorted(zip(runner.labels, probs.tolist()), key=lambda p: -p[1])
        out.append(Classification(text, ranked[0][0], ranked[0][1], dict(ranked)))
    return out[0] if single else out


def tag(model, texts, *, sources=None):
    """The entities of each text (a `Tagging`; a list for a list of texts), as character spans.

    `sources` name the texts in errors (default ``texts[i]``).
    """
    runner = _runner(model, "tag")
    texts, single = _texts(texts)
    tokens = [runner.tokenizer.tokens(text) for text in texts]
    _check_length(runner, tokens, sources)
    out = []
    for text, toks, probs in zip(texts, tokens, runner.run([[t.id for t in seq] for seq in tokens])):
        if probs is None:
            out.append(Tagging(text, []))
            continue
        best = probs.max(-1)
        labels = [runner.labels[i] for i in best.indices.tolist()]
        out.append(Tagging(text, decode_entities(text, piece_spans(toks, len(text)), labels, best.values.tolist())))
    return out[0] if single else out


def decode_entities(text: str, spans: list[tuple[int, int]], labels: list[str], scores: list[float]) -> list[Entity]:
    """Entities from per-piece BIO labels, as character spans of `text`.

    Pieces sharing a span (the byte-fallback pieces of one character) count once, by their
    first piece. B-X starts an entity; I-X continues an X entity and otherwise starts one
    (as seqeval reads IOB); O ends it. Spans lose their outer whitespace.
    """
    entities: list[Entity] = []
    current: list | None = None  # [type, start, end, scores]

    def close():
        if current is not None:
            start, end = strip_span(text, current[1], current[2])
            if end > start:
                entities.append(Entity(start, end, current[0], text[start:end],
                                       sum(current[3]) / len(current[3])))

    previous = None
    for span, label, score in zip(spans, labels, scores):
        if span == previous:
            if current is not None:
                current[3].append(score)
            continue
        previous = span
        prefix, _, kind = label.partition("-")
        if label == "O" or not kind:
            close()
            current = None
        elif prefix in ("B", "S") or current is None or current[0] != kind:
            close()
            current = [kind, span[0], span[1], [score]]
        else:
            current[2] = span[1]
            current[3].append(score)
        if prefix in ("E", "S") and current is not None:
            close()
            current = None
    close()
    return entities


def piece_spans(tokens: list, length: int) -> list[tuple[int, int]]:
    """Character span of each piece of `tokens` (`Tokenizer.tokens` of a text of `length` characters).

    sentencepiece gives the byte-fallback pieces of one character an empty span at the
    character, except the last, which covers it: here each of them covers the character.
    """
    return [(t.start, t.start + 1) if t.start == t.end and t.start < length else (t.start, t.end) for t in tokens]


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without leading or trailing whitespace (a piece may carry the space before a word)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
