"""Metrics: text overlap with a tokenization that is right for the language, and choice accuracy.

rouge-score's default tokenizer keeps only `[a-z0-9]`, so any Japanese prediction scores
ROUGE 0.0, even one identical to its reference. Here ROUGE runs through rouge-score's own
scorer with a tokenizer object picked for the text (MeCab words, characters, or words split
at whitespace and punctuation), BLEU and chrF through sacrebleu with the matching
tokenization, and the choice is part of every result.

Every metric is an `Aggregate`: the per-item numbers an item record keeps for it, and how a
corpus value follows from a set of those rows. Summaries, bootstrap intervals and paired
comparisons all go through it, so a resumed or compared run needs nothing but its JSONL.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property

from toolbox.errors import ToolboxError

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TEXT_METRICS = (*ROUGE, "bleu", "chrf", "exact_match")
CHOICE_METRICS = ("acc", "acc_norm")
PERPLEXITY_METRICS = ("ppl",)
TOKENIZER_CHOICES = ("auto", "mecab", "char", "whitespace")
INSTALL_HINT = "pip install 'rinna-toolbox[eval]'"

_KANA = re.compile(r"[\u3041-\u309f\u30a0-\u30ff\uff66-\uff9f]")
_CJK = re.compile(r"[\u3041-\u309f\u30a0-\u30ff\uff66-\uff9f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[^\W_]+")
_JA_SENTENCE_END = re.compile(r"([。！？!?])(?!\n)")


def script_of(texts) -> str:
    """"ja" when the texts are mostly CJK with some kana, "cjk" without kana, else "other"."""
    cjk = kana = letters = 0
    for text in texts:
        letters += sum(1 for ch in text if not ch.isspace())
        cjk += len(_CJK.findall(text))
        kana += len(_KANA.findall(text))
    if letters == 0 or cjk < 0.3 * letters:
        return "other"
    return "ja" if kana else "cjk"


def _normalize(text: str) -> str:
    """NFKC (full- and half-width forms alike) and lower case, as ROUGE compares words."""
    return unicodedata.normalize("NFKC", text).lower()


def mecab_missing() -> str | None:
    """None when MeCab works for both ROUGE (fugashi + unidic-lite) and BLEU (sacrebleu's ja-mecab)."""
    for module, package in (("fugashi", "fugashi"), ("unidic_lite", "unidic-lite"), ("MeCab", "mecab-python3"),
                            ("ipadic", "ipadic")):
        try:
            __import__(module)
        except ImportError:
            return package
    return None


class MetricTokenizer:
    """Splits text into the units ROUGE counts; knows the sacrebleu tokenizer that matches it.

    rouge-score calls `tokenize(text)`; for ROUGE-Lsum it first splits the text at newlines,
    so `sentences` marks Japanese sentence ends with a newline (no tokenizer keeps newlines).
    """

    name = ""
    bleu_tokenize = ""

    def __init__(self, reason: str = "chosen"):
        self.reason = reason

    def tokenize(self, text: str) -> list[str]:
        raise NotImplementedError

    def sentences(self, text: str) -> str:
        return text

    def describe(self) -> str:
        return f"{self.name} ({self.reason}; {self.detail}; BLEU tokenize={self.bleu_tokenize})"

    @property
    def detail(self) -> str:
        return ""

    def to_json(self) -> dict:
        return {"name": self.name, "reason": self.reason, "detail": self.detail, "bleu_tokenize": self.bleu_tokenize}


class MecabTokenizer(MetricTokenizer):
    name = "mecab"
    bleu_tokenize = "ja-mecab"

    @cached_property
    def _tagger(self):
        import fugashi

        return fugashi.Tagger()

    @property
    def detail(self) -> str:
        from importlib.metadata import version
        from pathlib import Path

        dic = Path(self._tagger.dictionary_info[0]["filename"]).parent.parent.name  # .../<package>/dicdir/sys.dic
        return f"fugashi {version('fugashi')} + {dic.replace('_', '-')}"

    def tokenize(self, text: str) -> list[str]:
        return [w.surface for w in self._tagger(_normalize(text)) if w.surface.strip()]

    def sentences(self, text: str) -> str:
        return _JA_SENTENCE_END.sub("\\1\n", text)


class CharTokenizer(MetricTokenizer):
    name = "char"
    bleu_tokenize = "char"

    @property
    def detail(self) -> str:
        return "every non-space character"

    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in _normalize(text) if not ch.isspace()]

    def sentences(self, text: str) -> str:
        return _JA_SENTENCE_END.sub("\\1\n", text)


class WhitespaceTokenizer(MetricTokenizer):
    name = "whitespace"
    bleu_tokenize = "13a"

    @property
    def detail(self) -> str:
        return "words split at spaces and punctuation (rouge-score's rule, any script)"

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(_normalize(text))


def pick_tokenizer(choice: str, texts) -> MetricTokenizer:
    """The tokenizer for `choice`; "auto" looks at `texts` (the references): MeCab for Japanese
    when installed, else characters; characters for other CJK text; words otherwise."""
    if choice == "auto":
        script = script_of(texts)
        if script == "ja":
            missing = mecab_missing()
            if missing is None:
                return MecabTokenizer("auto: Japanese text")
            return CharTokenizer(f"auto: Japanese text, MeCab not installed ({missing})")
        if script == "cjk":
            return CharTokenizer("auto: CJK text without kana")
        return WhitespaceTokenizer("auto: not CJK text")
    if choice == "mecab":
        missing = mecab_missing()
        if missing is not None:
            raise ToolboxError(f"--metric-tokenizer mecab needs {missing}: {INSTALL_HINT}")
        return MecabTokenizer()
    kinds = {"char": CharTokenizer, "whitespace": WhitespaceTokenizer}
    if choice not in kinds:
        raise ToolboxError(f"metric tokenizer {choice!r}: expected one of {', '.join(TOKENIZER_CHOICES)}")
    return kinds[choice]()


def _require(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ToolboxError(f"{what} needs {module}: {INSTALL_HINT}") from None


class TextScorer:
    """Per-item text metrics (and the sufficient statistics of BLEU and chrF) for one run."""

    def __init__(self, tokenizer: MetricTokenizer, metrics: tuple[str, ...]):
        unknown = [m for m in metrics if m not in TEXT_METRICS]
        if unknown:
            raise ToolboxError(f"unknown metric {unknown[0]!r}; generation metrics: {', '.join(TEXT_METRICS)}")
        self.tokenizer, self.metrics = tokenizer, tuple(metrics)
        rouge = [m for m in metrics if m in ROUGE]
        self._rouge = None
        if rouge:
            scorer = _require("rouge_score.rouge_scorer", "ROUGE")
            self._rouge = scorer.RougeScorer(rouge, tokenizer=tokenizer)
        if "bleu" in metrics or "chrf" in metrics:
            _require("sacrebleu", "BLEU and chrF")
            self._bleu_corpus = bleu_metric(tokenizer.bleu_tokenize)
            self._bleu_sentence = bleu_metric(tokenizer.bleu_tokenize, effective_order=True)
            self._chrf = chrf_metric()

    def score(self, prediction: str, reference: str) -> tuple[dict, dict]:
        """(metric -> value, metric -> statistics row) for one prediction."""
        values, stats = {}, {}
        if self._rouge is not None:
            split = self.tokenizer.sentences
            for name, s in self._rouge.score(split(reference), split(prediction)).items():
                values[name] = s.fmeasure
        if "bleu" in self.metrics:
            row = self._bleu_corpus._extract_corpus_statistics([prediction], [[reference]])[0]
            stats["bleu"] = [int(x) for x in row]
            values["bleu"] = self._bleu_sentence._compute_score_from_stats(row).score
        if "chrf" in self.metrics:
            row = self._chrf._extract_corpus_statistics([prediction], [[reference]])[0]
            stats["chrf"] = [int(x) for x in row]
            values["chrf"] = self._chrf._compute_score_from_stats(row).score
        if "exact_match" in self.metrics:
            values["exact_match"] = float(prediction.strip() == reference.strip())
        return {m: values[m] for m in self.metrics}, stats


def bleu_metric(tokenize: str, effective_order: bool = False):
    from sacrebleu.metrics import BLEU

    try:
        return BLEU(tokenize=tokenize, effective_order=effective_order)
    except (RuntimeError, AssertionError) as exc:  # ja-mecab without its dictionary
        raise ToolboxError(f"BLEU tokenize={tokenize}: {str(exc).strip().splitlines()[0]}; {INSTALL_HINT}") from None


def chrf_metric():
    from sacrebleu.metrics import CHRF

    return CHRF()


def choice_result(loglikelihoods: list[float], choices: list[str], gold: int) -> dict:
    """acc and acc_norm of one multiple-choice item, as lm-evaluation-harness defines them:
    acc picks the choice with the highest log-likelihood, acc_norm the highest log-likelihood
    per character of the choice text (the delimiter not counted); ties go to the first."""
    pred = _argmax(loglikelihoods)
    pred_norm = _argmax([ll / len(c) for ll, c in zip(loglikelihoods, choices)])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred, "pred_norm": pred_norm}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# -- aggregation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregate:
    """How the corpus value of metric `name` follows from per-item rows.

    kind "mean": rows are the item values; "bleu"/"chrf": rows are sacrebleu's sufficient
    statistics, summed then scored (corpus BLEU is not a mean of sentence BLEU);
    "ppl": rows are (negative log-likelihood in nats, tokens), perplexity of the sums.
    """

    name: str
    kind: str

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "ppl"

    def row(self, record: dict) -> list[float]:
        if self.kind == "mean":
            return [float(record["metrics"][self.name])]
        return [float(x) for x in record["stats"][self.name]]

    def value(self, rows) -> float:
        """The corpus value of an (items x k) array of rows."""
        return self.values(rows[None, ...])[0]

    def values(self, samples) -> list[float]:
        """Corpus values of a (samples x items x k) array: one per bootstrap sample."""
        if self.kind == "mean":
            return list(samples[..., 0].mean(axis=1))
        sums = samples.sum(axis=1)
        if self.kind == "ppl":
            return [math.exp(nll / n) if n else float("nan") for nll, n in sums]
        metric = bleu_metric("none") if self.kind == "bleu" else chrf_metric()
        return [metric._compute_score_from_stats([int(round(x)) for x in s]).score for s in sums]


def aggregate_for(metric: str) -> Aggregate:
    kind = {"bleu": "bleu", "chrf": "chrf", "ppl": "ppl"}.get(metric, "mean")
    return Aggregate(metric, kind)
