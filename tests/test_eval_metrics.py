"""Eval metrics against hand-computed values and against the libraries they wrap (no model).

Japanese ROUGE is the case the usual tools get wrong: rouge-score's default tokenizer keeps
only [a-z0-9], so identical Japanese strings score 0.0. Here they score 1.0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

from rouge_score import rouge_scorer  # noqa: E402

from toolbox.eval.metrics import (  # noqa: E402
    CharTokenizer,
    MecabTokenizer,
    TextScorer,
    WhitespaceTokenizer,
    aggregate_for,
    choice_result,
    mecab_missing,
    pick_tokenizer,
)
from toolbox.eval.stats import bootstrap, paired_bootstrap  # noqa: E402

ALL = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "exact_match")
needs_mecab = pytest.mark.skipif(mecab_missing() is not None, reason=f"MeCab not installed ({mecab_missing()})")


def scores(tokenizer, prediction, reference, metrics=ALL):
    return TextScorer(tokenizer, metrics).score(prediction, reference)[0]


def test_rouge_score_default_tokenizer_fails_on_japanese():
    """The bug this module exists for: the reference library's default gives 0.0 to an exact match."""
    s = rouge_scorer.RougeScorer(["rouge1"]).score("吾輩は猫である。", "吾輩は猫である。")
    assert s["rouge1"].fmeasure == 0.0


@pytest.mark.parametrize("tokenizer", [pytest.param(MecabTokenizer(), marks=needs_mecab), CharTokenizer()],
                         ids=["mecab", "char"])
def test_identical_japanese_scores_one_and_disjoint_zero(tokenizer):
    text = "吾輩は猫である。名前はまだ無い。"
    same = scores(tokenizer, text, text)
    assert same == {m: pytest.approx(100.0 if m in ("bleu", "chrf") else 1.0) for m in ALL}
    other = scores(tokenizer, "どこで生れたかとんと見当がつかぬ", "吾輩猫名前無")
    assert {m: other[m] for m in ("rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match")} == dict.fromkeys(
        ("rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match"), 0.0)


def test_char_rouge_hand_computed():
    # 猫が好き vs 猫は好き: unigrams 3 of 4 shared -> P = R = F = 0.75; bigrams {猫が, が好, 好き} vs
    # {猫は, は好, 好き}: 1 of 3 -> 1/3; LCS 猫好き = 3 -> 0.75
    s = scores(CharTokenizer(), "猫は好き", "猫が好き", ("rouge1", "rouge2", "rougeL"))
    assert s == {"rouge1": pytest.approx(0.75), "rouge2": pytest.approx(1 / 3), "rougeL": pytest.approx(0.75)}


@needs_mecab
def test_mecab_rouge_hand_computed():
    tok = MecabTokenizer()
    assert tok.tokenize("吾輩は犬である。") == ["吾輩", "は", "犬", "で", "ある", "。"]
    # 6 words each, 5 shared; bigrams shared: 吾輩は, である, ある。 = 3 of 5; LCS = 5
    s = scores(tok, "吾輩は犬である。", "吾輩は猫である。", ("rouge1", "rouge2", "rougeL"))
    assert s == {"rouge1": pytest.approx(5 / 6), "rouge2": pytest.approx(3 / 5), "rougeL": pytest.approx(5 / 6)}


def test_rouge_lsum_splits_japanese_sentences():
    """Lsum is summary-level LCS over sentences: two sentences in swapped order keep Lsum at 1.0,
    while plain L (one sequence) drops."""
    s = scores(CharTokenizer(), "犬が吠える。猫が鳴く。", "猫が鳴く。犬が吠える。", ("rougeL", "rougeLsum"))
    assert s["rougeLsum"] == pytest.approx(1.0)
    assert s["rougeL"] < 0.7


def test_whitespace_tokenizer_equals_rouge_score_default_on_english():
    pred = "The cat sat on the mat, didn't it? 3 cats!"
    ref = "A cat was sitting on the mat; the 3 dogs weren't."
    ours = scores(WhitespaceTokenizer(), pred, ref, ("rouge1", "rouge2", "rougeL"))
    theirs = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(ref, pred)
    assert ours == {k: pytest.approx(v.fmeasure) for k, v in theirs.items()}


def test_normalization_full_and_half_width_alike():
    assert scores(CharTokenizer(), "ＡＢＣｱｲｳ", "abcアイウ", ("rouge1",))["rouge1"] == pytest.approx(1.0)


def test_char_bleu_hand_computed():
    # あいうえか vs あいうえお, characters: n-gram precisions 4/5, 3/4, 2/3, 1/2, equal length (BP 1)
    bleu = scores(CharTokenizer(), "あいうえか", "あいうえお", ("bleu",))["bleu"]
    assert bleu == pytest.approx(100 * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25)


@needs_mecab
def test_ja_mecab_bleu_hand_computed():
    """BLEU through sacrebleu's ja-mecab: 吾輩/は/犬/で/ある/。 against 吾輩/は/猫/で/ある/。 — precisions
    5/6, 3/5, 1/4 and no 4-gram of 3, which sacrebleu's exp smoothing counts as 1/(2*3)."""
    bleu = scores(MecabTokenizer(), "吾輩は犬である。", "吾輩は猫である。", ("bleu",))["bleu"]
    assert bleu == pytest.approx(100 * ((5 / 6) * (3 / 5) * (1 / 4) * (1 / 6)) ** 0.25, abs=1e-9)


@pytest.mark.parametrize("tokenizer", [CharTokenizer(), WhitespaceTokenizer(),
                                       pytest.param(MecabTokenizer(), marks=needs_mecab)], ids=["char", "ws", "mecab"])
def test_corpus_bleu_and_chrf_from_item_statistics_equal_sacrebleu(tokenizer):
    import sacrebleu

    preds = ["吾輩は猫である。", "名前はまだ無い", "The cat sat.", "どこで生れたか見当がつかぬ。"]
    refs = ["吾輩は犬である。", "名前はまだ無い。", "The cat sat on the mat.", "どこで生れたかとんと見当がつかぬ。"]
    scorer = TextScorer(tokenizer, ("bleu", "chrf"))
    records = [{"metrics": v, "stats": s} for v, s in (scorer.score(p, r) for p, r in zip(preds, refs))]
    for name, reference in (("bleu", sacrebleu.corpus_bleu(preds, [refs], tokenize=tokenizer.bleu_tokenize)),
                            ("chrf", sacrebleu.corpus_chrf(preds, [refs]))):
        agg = aggregate_for(name)
        rows = np.array([agg.row(r) for r in records])
        assert agg.value(rows) == pytest.approx(reference.score, abs=1e-9)


def test_exact_match_ignores_surrounding_space_only():
    s = TextScorer(CharTokenizer(), ("exact_match",))
    assert s.score(" 吾輩は猫である。\n", "吾輩は猫である。")[0]["exact_match"] == 1.0
    assert s.score("吾輩は猫である", "吾輩は猫である。")[0]["exact_match"] == 0.0


def test_auto_tokenizer_choice_is_reported():
    ja = pick_tokenizer("auto", ["吾輩は猫である。名前はまだ無い。"])
    assert ja.name == ("mecab" if mecab_missing() is None else "char")
    assert ja.reason.startswith("auto: Japanese text")
    assert pick_tokenizer("auto", ["The cat sat on the mat."]).name == "whitespace"
    assert pick_tokenizer("auto", ["我们今天去公园散步"]).name == "char"
    assert "BLEU tokenize=" in ja.describe()


def test_choice_accuracy_as_lm_eval_defines_it():
    # acc: highest log-likelihood (choice 0, -10 > -12); acc_norm: per character of the choice
    # text, -10/2 = -5 against -12/6 = -2 -> choice 1
    r = choice_result([-10.0, -12.0], ["ab", "abcdef"], gold=1)
    assert (r["pred"], r["pred_norm"], r["acc"], r["acc_norm"]) == (0, 1, 0.0, 1.0)
    tie = choice_result([-3.0, -3.0, -5.0], ["x", "y", "zz"], gold=1)
    assert (tie["pred"], tie["acc"]) == (0, 0.0)  # ties go to the first, as numpy's argmax


def test_perplexity_aggregate_is_token_weighted():
    agg = aggregate_for("ppl")
    rows = np.array([[10.0, 5.0], [2.0, 1.0]])  # (nll, tokens)
    assert agg.value(rows) == pytest.approx(math.exp(12.0 / 6.0))
    assert not agg.higher_is_better


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    agg = aggregate_for("rouge1")
    rows = np.arange(20, dtype=float).reshape(-1, 1) / 20
    a, b = bootstrap(agg, rows, 500, seed=3), bootstrap(agg, rows, 500, seed=3)
    assert a == b
    assert a.value == pytest.approx(rows.mean())
    assert a.low < a.value < a.high
    flat = bootstrap(agg, np.full((10, 1), 0.5), 200)
    assert (flat.low, flat.high) == (pytest.approx(0.5), pytest.approx(0.5))


def test_paired_bootstrap_counts_wins_ties_losses():
    agg = aggregate_for("exact_match")
    a = np.array([[1.0], [0.0], [0.0], [1.0], [1.0]])
    b = np.array([[1.0], [1.0], [0.0], [0.0], [1.0]])
    p = paired_bootstrap(agg, a, b, a[:, 0], b[:, 0], 300)
    assert (p.wins, p.ties, p.losses, p.n) == (1, 3, 1, 5)
    assert p.diff == pytest.approx(0.0)
    assert p.low <= 0.0 <= p.high
    ppl = aggregate_for("ppl")
    lower = paired_bootstrap(ppl, np.array([[4.0, 2.0]]), np.array([[2.0, 2.0]]), [7.4], [2.7], 0)
    assert (lower.wins, lower.losses) == (1, 0)  # lower perplexity wins
