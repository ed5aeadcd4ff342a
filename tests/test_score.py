"""`toolbox score`: exactness against transformers, the window plan, statistics, inputs, errors.

Runs on the small random checkpoint of model_fixtures (context 96, the embedded tokenizer);
references are computed here with transformers' GPTNeoXForCausalLM in fp32 and numpy.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_fixtures import TINY_CONTEXT as CONTEXT

from toolbox.backend import LoadOptions, TokenScores
from toolbox.backends import registered as backends
from toolbox.cli import cli
from toolbox.scoring import (
    Accumulator,
    plan_windows,
    score_documents,
    stats_from_sums,
    window_count,
)

HERE = Path(__file__).resolve().parent

# Our own sentences (a few are long enough to need several windows of the 96-token context).
TEXTS = [
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。",
    "今日は天気が良いので、公園まで散歩に行きましょう。🍣と🍜",
    "a",
]
LONG = "".join(
    f"第{i}章。先生は黒板に漢字を書き、生徒はそれをノートに写した。電車が駅に着くと、人々は一斉に降りていった。"
    for i in range(1, 9)
)

# Agreement of each built-in backend with cpu float32, per scored token and over the corpus
# (the same figures are stated in docs/score.md).
TOLERANCES = {  # (backend, dtype): (max |Δ logprob|, mean |Δ logprob|, |Δ mean NLL|)
    ("cpu", "float32"): (1e-4, 1e-5, 1e-6),
    ("cpu", "bfloat16"): (0.15, 0.03, 0.01),
    ("quant", "int8"): (0.5, 0.08, 0.01),
}


def run(*args, input=None):
    return CliRunner().invoke(cli, ["score", *args], input=input, catch_exceptions=False)


def score_json(ckpt, *args, input=None):
    """The per-text records and the corpus object of `toolbox score --json`."""
    result = run("-m", str(ckpt), "-b", "cpu", "--json", *args, input=input)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert "corpus" in lines[-1] and all("corpus" not in r for r in lines[:-1])
    return lines[:-1], lines[-1]["corpus"]


def one_line_error(result, code=1) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def sp(tiny_checkpoint):
    return spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "spiece.model"))


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def hf_logits(hf, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def hf_loss_total(hf, ids) -> float:
    """Total log-likelihood of ids[1:] from transformers' own loss (mean NLL x count)."""
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    return -loss * (len(ids) - 1)


def expected_start(t: int, length: int, window: int, stride: int) -> int:
    """The documented policy, written independently of plan_windows: where token t's window starts."""
    if length <= window or t < window:
        return 0
    chunk = (t - window) // stride
    end = min(window + (chunk + 1) * stride, length)
    return end - window


# -- exactness ------------------------------------------------------------------------


def test_short_texts_match_transformers_loss(tiny_checkpoint, hf, sp):
    records, corpus = score_json(tiny_checkpoint, input="\n".join(TEXTS[:3]) + "\n")
    assert len(records) == 3
    total = 0.0
    for rec, text in zip(records, TEXTS):
        ids = sp.encode(text)
        assert len(ids) < CONTEXT and rec["tokens"] == len(ids) and rec["scored"] == len(ids) - 1
        want = hf_loss_total(hf, ids)
        assert rec["logprob"] == pytest.approx(want, rel=1e-5)
        assert rec["mean_nll"] == pytest.approx(-want / (len(ids) - 1), rel=1e-5)
        assert rec["ppl"] == pytest.approx(math.exp(-want / (len(ids) - 1)), rel=1e-5)
        total += want
    assert corpus["logprob"] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize(
    "window,stride,prefix",
    [(None, None, "none"), (32, 12, "none"), (40, 39, "bos"), (24, 1, "eos")],
)
def test_sliding_window_matches_token_by_token_reference(tiny_checkpoint, hf, sp, window, stride, prefix):
    text = LONG if window is None else LONG[:260]
    args = ["--per-token", "--prefix", prefix]
    args += [] if window is None else ["--window", str(window), "--stride", str(stride)]
    [rec], corpus = score_json(tiny_checkpoint, text, *args)
    W = window or CONTEXT
    S = stride or W // 2
    assert (corpus["window"], corpus["stride"]) == (W, S)
    ids = sp.encode(text)
    full = ([] if prefix == "none" else [{"bos": 2, "eos": 3}[prefix]]) + ids
    assert len(full) > 2 * W  # several windows
    got = [t["logprob"] for t in rec["per_token"]]
    offset = 1 if prefix == "none" else 0
    assert got[:offset] == [None] * offset and None not in got[offset:]
    # Every scored token again, on its own, with exactly its window's left context.
    want = []
    for t in range(1, len(full)):
        start = expected_start(t, len(full), W, S)
        assert t - start >= min(t, W - S)
        logits = hf_logits(hf, full[start:t])[-1]
        want.append(logits.log_softmax(-1)[full[t]].item())
    np.testing.assert_allclose(got[offset:], want, rtol=1e-5, atol=2e-5)
    assert rec["logprob"] == pytest.approx(sum(want), rel=1e-5)


def test_runtime_score_from_matches_full_scores_and_ranks(tiny_checkpoint, hf):
    from toolbox.runtime.generation import score as runtime_score
    from toolbox.runtime.model import GPTNeoX

    ours = GPTNeoX.from_pretrained(tiny_checkpoint)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(4, 8000, (n,), generator=g).tolist() for n in (40, 7, 96, 1, 0, 40, 25)]
    firsts = [30, 1, 50, 1, 1, 1, 25]
    got = runtime_score(ours, seqs, max_batch_tokens=100, first=firsts)  # several ragged batches
    for seq, f, res in zip(seqs, firsts, got):
        n = max(len(seq) - f, 0)
        assert res.logprobs.shape == res.ranks.shape == (n,)
        if n == 0:
            continue
        logits = hf_logits(hf, seq)[f - 1 : -1]
        target = torch.tensor(seq[f:])
        want = logits.log_softmax(-1).gather(1, target[:, None])[:, 0]
        torch.testing.assert_close(res.logprobs, want, rtol=1e-5, atol=2e-5)
        ranks = (logits.argsort(-1, descending=True) == target[:, None]).int().argmax(-1) + 1
        assert res.ranks.tolist() == ranks.tolist()
    with pytest.raises(ValueError, match="outside 1..7"):
        runtime_score(ours, [seqs[1]], first=[8])


def test_per_token_ranks_match_transformers_logits(tiny_checkpoint, hf, sp):
    text = TEXTS[2]
    [rec], _ = score_json(tiny_checkpoint, text, "--per-token")
    ids = sp.encode(text)
    assert [t["id"] for t in rec["per_token"]] == ids
    assert [t["piece"] for t in rec["per_token"]] == [sp.id_to_piece(i) for i in ids]
    logits = hf_logits(hf, ids)[:-1]
    order = logits.argsort(-1, descending=True)  # independent of the `>` count used inside
    want = [(order[k] == ids[k + 1]).nonzero().item() + 1 for k in range(len(ids) - 1)]
    assert [t["rank"] for t in rec["per_token"]] == [None] + want
    assert len(set(want)) > 1


# -- window plan ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    length=st.integers(0, 3000),
    window=st.integers(2, 400),
    data=st.data(),
)
def test_window_plan_properties(length, window, data):
    stride = data.draw(st.integers(1, window - 1))
    plan = plan_windows(length, window, stride)
    assert len(plan) == window_count(length, window, stride)
    targets = [t for w in plan for t in range(w.first, w.end)]
    assert targets == list(range(1, length))  # every token but the first, once, in order
    for k, w in enumerate(plan):
        assert 0 <= w.start < w.first < w.end <= length and w.end - w.start <= window
        for t in (w.first, w.end - 1):
            assert t - w.start >= min(t, window - stride)  # left context
        if k > 0:
            assert w.end - w.start == window  # later windows (the final one too) are full
            assert w.end - w.first <= stride
    if plan:
        assert plan[0].start == 0 and plan[0].first == 1


def test_plan_rejects_bad_settings():
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 8, 8)
    with pytest.raises(ValueError, match="at least 2"):
        plan_windows(10, 1, 1)


# -- prefix ------------------------------------------------------------------------------


def test_prefix_token_counts(tiny_checkpoint, hf, sp):
    text = TEXTS[0]
    ids = sp.encode(text)
    seen = {}
    for prefix, extra in (("none", []), ("bos", [2]), ("eos", [3])):
        [rec], corpus = score_json(tiny_checkpoint, text, "--prefix", prefix, "--per-token")
        assert rec["tokens"] == len(ids) and corpus["prefix"] == prefix
        assert rec["scored"] == len(ids) - (0 if extra else 1)
        assert len(rec["per_token"]) == len(ids)  # the prefix is not one of the text's tokens
        assert rec["logprob"] == pytest.approx(hf_loss_total(hf, extra + ids), rel=1e-5)
        seen[prefix] = rec["logprob"]
    assert len(set(seen.values())) == 3
    # A one-token text: nothing to score without a prefix, one token with it.
    [rec], corpus = score_json(tiny_checkpoint, "a", "--per-token")
    assert rec["scored"] == 0 and rec["ppl"] is None and corpus["ppl"] is None
    [rec], _ = score_json(tiny_checkpoint, "a", "--prefix", "bos")
    assert rec["scored"] == 1 and rec["ppl"] is not None


# -- backends ------------------------------------------------------------------------------


def test_builtin_backends_agree_with_cpu_float32(tiny_checkpoint, sp):
    docs = [sp.encode(t) for t in TEXTS] + [sp.encode(LONG)]
    registered = backends()
    ref = registered["cpu"].load(tiny_checkpoint, LoadOptions(dtype="float32"))
    want = score_documents(ref, docs, CONTEXT, CONTEXT // 2)
    want_flat = np.array([x for s in want for x in s.logprobs])
    checked = []
    for (name, dtype), (max_abs, mean_abs, nll) in TOLERANCES.items():
        backend = registered.get(name)
        if backend is None or backend.unavailable_reason() is not None:
            continue
        model = backend.load(tiny_checkpoint, LoadOptions(dtype=dtype))
        got = score_documents(model, docs, CONTEXT, CONTEXT // 2)
        assert [len(s.logprobs) for s in got] == [len(s.logprobs) for s in want]
        flat = np.array([x for s in got for x in s.logprobs])
        diff = np.abs(flat - want_flat)
        assert diff.max() <= max_abs and diff.mean() <= mean_abs, (name, dtype, diff.max(), diff.mean())
        assert abs(flat.mean() - want_flat.mean()) <= nll
        checked.append((name, dtype))
    assert {("cpu", "float32"), ("cpu", "bfloat16"), ("quant", "int8")} <= set(checked)


def test_default_score_from_of_a_plugin_backend(tiny_checkpoint, sp):
    """A backend that implements only `score` (the example plugin) gets `score_from` by slicing."""
    path = HERE.parent / "plugins" / "example" / "toolbox_hf_example.py"
    spec = importlib.util.spec_from_file_location("toolbox_hf_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.HFBackend().load(tiny_checkpoint, LoadOptions())
    cpu = backends()["cpu"].load(tiny_checkpoint, LoadOptions())
    docs = [sp.encode(LONG[:200]), sp.encode("猫")]
    for a, b in zip(score_documents(plugin, docs, 40, 16), score_documents(cpu, docs, 40, 16)):
        assert isinstance(a, TokenScores) and a.ranks == b.ranks
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_compare(tiny_checkpoint):
    lines = "\n".join(TEXTS[:3]) + "\n"
    records, corpus = score_json(tiny_checkpoint, "--compare", "quant", "--per-token", input=lines)
    a, _ = score_json(tiny_checkpoint, "--per-token", input=lines)
    b_result = run("-m", str(tiny_checkpoint), "-b", "quant", "--json", "--per-token", input=lines)
    b = [json.loads(x) for x in b_result.stdout.splitlines()[:-1]]
    lp_a = [t["logprob"] for r in a for t in r["per_token"] if t["logprob"] is not None]
    lp_b = [t["logprob"] for r in b for t in r["per_token"] if t["logprob"] is not None]
    cmp = corpus["compare"]
    assert cmp["backend"] == "quant" and corpus["backend"] == "cpu"
    assert corpus["ppl"] == pytest.approx(math.exp(-np.mean(lp_a)), rel=1e-5)
    assert cmp["ppl"] == pytest.approx(math.exp(-np.mean(lp_b)), rel=1e-5)
    assert cmp["mean_abs_logprob_diff"] == pytest.approx(np.mean(np.abs(np.subtract(lp_a, lp_b))), abs=2e-6)
    assert 0 < cmp["mean_abs_logprob_diff"] <= cmp["max_abs_logprob_diff"]
    assert [r["compare"]["ppl"] for r in records] == pytest.approx([r["ppl"] for r in b], rel=1e-6)
    # Human output: both perplexities and the difference.
    human = run("-m", str(tiny_checkpoint), "-b", "cpu", "--compare", "cpu:bfloat16", input=lines)
    assert human.exit_code == 0, human.output
    out = human.stdout
    assert "A " in out and "[cpu float32]" in out and "[cpu bfloat16]" in out and out.count(" +/- ") == 2
    assert "mean |Δlogprob| = " in out and "PPL B" in out


def test_compare_rejects_another_tokenizer(tiny_checkpoint, nfkc_model_dir):
    result = run("-m", str(tiny_checkpoint), "-b", "cpu", "--compare", str(nfkc_model_dir), "猫")
    assert "tokenizer differs" in one_line_error(result)


# -- statistics ------------------------------------------------------------------------------


def test_corpus_ppl_and_stderr_match_numpy(tiny_checkpoint):
    text = "\n".join(TEXTS + [LONG]) + "\n"
    records, corpus = score_json(tiny_checkpoint, "--per-token", input=text)
    lp = np.array([t["logprob"] for r in records for t in r["per_token"] if t["logprob"] is not None])
    nll = -lp
    n = len(nll)
    assert corpus["scored"] == n == sum(r["scored"] for r in records)
    ppl = math.exp(nll.mean())
    se = nll.std(ddof=1) / math.sqrt(n)  # = sqrt((mean(x^2) - mean^2) / (n - 1)), llama.cpp's figure
    assert corpus["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert corpus["nll_stderr"] == pytest.approx(se, rel=1e-5)
    assert corpus["ppl_stderr"] == pytest.approx(ppl * se, rel=1e-5)
    # Token-weighted: the corpus mean is not the mean of the texts' means.
    assert corpus["mean_nll"] != pytest.approx(np.mean([r["mean_nll"] for r in records if r["scored"]]), rel=1e-3)
    human = run("-m", str(tiny_checkpoint), "-b", "cpu", "--summary", input=text)
    line = f"PPL = {corpus['ppl']:.4f} +/- {corpus['ppl_stderr']:.5f} ({n} tokens, {len(records)} texts, 0 empty lines skipped"
    assert line in human.stdout


def test_stats_edge_cases():
    assert stats_from_sums(0, 0.0, 0.0).ppl is None
    one = stats_from_sums(1, -2.0, 4.0)
    assert one.ppl == pytest.approx(math.exp(2.0)) and one.ppl_stderr is None
    acc = Accumulator()
    acc.add([-1.5] * 10)  # zero variance, maybe slightly negative after rounding
    assert acc.stats().ppl_stderr == 0.0


# -- inputs ------------------------------------------------------------------------------------


def test_every_input_route_gives_the_same_scores(tiny_checkpoint, tmp_path):
    a, b = TEXTS[0], TEXTS[1]
    by_arg, _ = score_json(tiny_checkpoint, a)
    assert by_arg[0]["source"] == "argument" and by_arg[0]["text"] == a
    two_args, _ = score_json(tiny_checkpoint, "-t", a, b)
    by_stdin, corpus = score_json(tiny_checkpoint, input=f"{a}\n\n{b}\n")
    assert [r["line"] for r in by_stdin] == [1, 3] and corpus["empty_skipped"] == 1
    # The same numbers up to float rounding (a text alone or batched with others runs other kernels).
    same = lambda a, b: pytest.approx(b, rel=1e-6) == a  # noqa: E731
    assert same([r["logprob"] for r in two_args], [r["logprob"] for r in by_stdin])
    assert same(by_arg[0]["logprob"], by_stdin[0]["logprob"])

    f1, f2 = tmp_path / "one.txt", tmp_path / "two.txt"
    f1.write_text(f"{a}\n{b}\n", encoding="utf-8")
    f2.write_text(a, encoding="utf-8")
    files, corpus = score_json(tiny_checkpoint, str(f1), str(f2))
    assert [r["source"] for r in files] == [str(f1), str(f2)] and corpus["texts"] == 2
    assert "text" not in files[0]  # whole documents are not echoed
    whole, _ = score_json(tiny_checkpoint, "--whole", input=f"{a}\n{b}\n")
    assert same(whole[0]["logprob"], files[0]["logprob"]) and whole[0]["tokens"] == files[0]["tokens"]
    assert same(files[1]["logprob"], by_arg[0]["logprob"])

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": 1, "body": a}, ensure_ascii=False) + "\n\n"
                    + json.dumps({"body": b}, ensure_ascii=False) + "\n", encoding="utf-8")
    recs, corpus = score_json(tiny_checkpoint, "--input", str(data), "--field", "body")
    assert [(r["source"], r["line"]) for r in recs] == [(str(data), 1), (str(data), 3)]
    assert same([r["logprob"] for r in recs], [r["logprob"] for r in by_stdin]) and corpus["empty_skipped"] == 1
    from_stdin, _ = score_json(tiny_checkpoint, "--input", "-", "--field", "body", input=data.read_text("utf-8"))
    assert same([r["logprob"] for r in from_stdin], [r["logprob"] for r in recs])


def test_human_table_and_per_token_rendering(tiny_checkpoint):
    result = run("-m", str(tiny_checkpoint), "-b", "cpu", input=f"{TEXTS[0]}\n\n{TEXTS[1]}\n")
    assert result.exit_code == 0
    out = result.stdout
    assert "log-likelihood" in out and "stdin:1" in out and "stdin:3" in out
    assert " tokens, 2 texts, 1 empty line skipped; window 96, stride 48, prefix none)" in out
    per_token = run("-m", str(tiny_checkpoint), "-b", "cpu", "--per-token", TEXTS[2])
    assert per_token.exit_code == 0
    assert "surprisal" in per_token.stdout and "🍣" in per_token.stdout and "rank" in per_token.stdout


def test_usage_errors(tiny_checkpoint, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("猫", encoding="utf-8")
    base = ["-m", str(tiny_checkpoint), "-b", "cpu"]
    assert run(*base, str(f), "no-such-file.txt").exit_code == 2
    assert run(*base, "--whole", "猫").exit_code == 2
    assert run(*base, "--window", str(CONTEXT + 1), "猫").exit_code == 2
    assert run(*base, "--window", "16", "--stride", "16", "猫").exit_code == 2


# -- bad input -----------------------------------------------------------------------------------


def test_invalid_utf8_names_the_line(tiny_checkpoint, tmp_path):
    data = "猫\n\n".encode() + b"bad \xff byte\n" + "犬\n".encode()
    base = ["-m", str(tiny_checkpoint), "-b", "cpu", "--json"]
    error = one_line_error(run(*base, input=data))
    assert error.startswith("Error: stdin line 3: invalid UTF-8 (byte 0xff")
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    assert one_line_error(run(*base, str(path))).startswith(f"Error: {path} line 3: invalid UTF-8")
    result = run(*base, "--skip-invalid", input=data)
    assert result.exit_code == 0
    recs = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["line"] for r in recs[:-1]] == [1, 4]
    assert recs[-1]["corpus"]["invalid_skipped"] == 1 and recs[-1]["corpus"]["empty_skipped"] == 1
    assert "skipped: stdin line 3: invalid UTF-8" in result.stderr
    replaced = run(*base, "--errors", "replace", input=data)
    assert len(replaced.stdout.splitlines()) == 4


def test_bad_jsonl_lines_are_named(tiny_checkpoint, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = ['{"text": "猫"}', "", "{not json", '{"other": 1}', '{"text": 5}', "[1, 2]", '{"text": "犬"}']
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    base = ["-m", str(tiny_checkpoint), "-b", "cpu", "--json", "--input", str(path)]
    assert one_line_error(run(*base)).startswith(f"Error: {path} line 3: not JSON (")
    result = run(*base, "--skip-invalid")
    assert result.exit_code == 0, result.output
    recs = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["line"] for r in recs[:-1]] == [1, 7]
    assert recs[-1]["corpus"]["invalid_skipped"] == 4 and recs[-1]["corpus"]["empty_skipped"] == 1
    warnings = result.stderr.strip().splitlines()
    assert warnings == [
        f"skipped: {path} line 3: not JSON (Expecting property name enclosed in double quotes at column 2)",
        f"skipped: {path} line 4: no 'text' field",
        f"skipped: {path} line 5: field 'text' is not a string",
        f"skipped: {path} line 6: no 'text' field",
    ]
    path.write_text('{"text": "猫"}\n{"body": "x"}\n', encoding="utf-8")
    assert one_line_error(run(*base)) == f"Error: {path} line 2: no 'text' field"
