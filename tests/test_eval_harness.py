"""lm-evaluation-harness through the toolbox adapter against lm-eval's own `hf` model on the
same checkpoint (the embedded model), on local custom tasks written here (offline): multiple
choice, rolling log-likelihood and generation. The `hf` side reads tokenizer files that
reproduce sentencepiece's ids; the test checks that it does, or the comparison would mean
nothing. `toolbox eval choice` on the same data is checked against the same reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolbox.registry import EMBEDDED_DIR

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "model.safetensors").is_file(), reason="no embedded weights")

DATA = Path(__file__).parent / "data" / "eval"
TASKS = ["neko_next", "neko_ppl", "neko_gen"]
CHOICE_ITEMS, TEXT_ITEMS = 8, 4
TOLERANCE = 1e-4


def _rows(name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()][:n]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three lm-eval task files over JSONL data (the `json` builder of datasets: no hub)."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, rows in (("next.jsonl", _rows("neko_next.jsonl", CHOICE_ITEMS)),
                       ("summary.jsonl", _rows("neko_summary.jsonl", TEXT_ITEMS))):
        (d / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    common = "dataset_path: json\ntest_split: test\n"
    (d / "neko_next.yaml").write_text(
        f"task: neko_next\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'next.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n", encoding="utf-8")
    (d / "neko_ppl.yaml").write_text(
        f"task: neko_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'summary.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{paragraph}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n",
        encoding="utf-8")
    (d / "neko_gen.yaml").write_text(
        f"task: neko_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'summary.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: \"{{paragraph}}\\n要約：\"\ndoc_to_target: '{{first_sentence}}'\n"
        "generation_kwargs:\n  until: ['。']\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_side(tmp_path_factory, task_dir, one_torch_thread):
    """lm-eval's `hf` model over a copy of the embedded checkpoint with sentencepiece-exact tokenizer files."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from toolbox.hf_tokenizer import write_tokenizer_files

    ckpt = tmp_path_factory.mktemp("hf_ckpt") / "embedded"
    shutil.copytree(EMBEDDED_DIR, ckpt)
    write_tokenizer_files(ckpt, ckpt / "spiece.model")
    lm = HFLM(pretrained=str(ckpt), dtype="float32", device="cpu", batch_size=8)
    results = simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(task_dir),
                              include_defaults=False), log_samples=True, bootstrap_iters=0)
    return lm, results


@pytest.fixture(scope="module")
def toolbox_model(one_torch_thread):
    import toolbox

    return toolbox.load(threads=1)


@pytest.fixture(scope="module")
def toolbox_side(task_dir, toolbox_model):
    from toolbox.eval.harness import run_harness

    return run_harness(toolbox_model, TASKS, include_path=str(task_dir), log_samples=True)


def test_hf_side_sees_sentencepiece_ids(hf_side, embedded_tok):
    lm, _ = hf_side
    texts = [r["context"] + c for r in _rows("neko_next.jsonl", CHOICE_ITEMS) for c in r["choices"]]
    texts += [r["paragraph"] + "\n要約：" for r in _rows("neko_summary.jsonl", TEXT_ITEMS)]
    texts += [r["context"] for r in _rows("neko_next.jsonl", CHOICE_ITEMS)]
    for text in texts:
        assert lm.tok_encode(text) == embedded_tok.encode(text), text
    assert lm.prefix_token_id == embedded_tok.special_ids["bos"]


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_adapter_loglikelihoods_equal_hf(hf_side, toolbox_side):
    _, hf = hf_side
    for task in ("neko_next", "neko_ppl"):
        ours, theirs = _samples(toolbox_side, task), _samples(hf, task)
        assert len(ours) == len(theirs) == (CHOICE_ITEMS if task == "neko_next" else TEXT_ITEMS)
        for a, b in zip(ours, theirs):
            for ra, rb in zip(a["resps"], b["resps"]):
                va, vb = ra[0], rb[0]
                if isinstance(va, (tuple, list)):  # (loglikelihood, is_greedy)
                    assert va[0] == pytest.approx(vb[0], abs=TOLERANCE) and bool(va[1]) == bool(vb[1])
                else:  # rolling
                    assert va == pytest.approx(vb, abs=TOLERANCE)
    for metric in ("acc,none", "acc_norm,none"):
        assert toolbox_side["results"]["neko_next"][metric] == hf["results"]["neko_next"][metric]
    assert toolbox_side["results"]["neko_ppl"]["bits_per_byte,none"] == pytest.approx(
        hf["results"]["neko_ppl"]["bits_per_byte,none"], abs=1e-5)


def test_adapter_generation_equals_hf(hf_side, toolbox_side, toolbox_model):
    """The same greedy tokens: HF's text decoded from the toolbox's tokens is HF's own text. (The
    texts themselves differ where the toy model emits stray UTF-8 bytes: transformers turns every
    byte of an invalid run into U+FFFD, the toolbox only the invalid ones.)"""
    lm, hf = hf_side
    theirs = _samples(hf, "neko_gen")
    ours = _samples(toolbox_side, "neko_gen")
    params = toolbox_model.params(max_new_tokens=16, temperature=0, stop=("。",))
    for a, b in zip(ours, theirs):
        context = b["arguments"][0][0]
        ids = toolbox_model.prompt_ids(context, 16, "plain", "left")
        tokens = toolbox_model.run([ids], params)[0].token_ids
        assert lm.tok_decode(tokens).split("。")[0] == b["resps"][0][0]
        assert a["resps"][0][0] == toolbox_model.detokenize(tokens).split("。")[0]
    assert any(s["resps"][0][0] for s in theirs)


def test_eval_choice_equals_lm_eval_hf(hf_side, tmp_path, one_torch_thread):
    """`toolbox eval choice` (its own runner and acc/acc_norm) against lm-eval's hf model."""
    from toolbox.commands.eval import eval_group

    _, hf = hf_side
    out = tmp_path / "choice.jsonl"
    r = CliRunner().invoke(eval_group, ["choice", "--data", str(DATA / "neko_next.jsonl"), "--input-field", "context",
                                        "--choices-field", "choices", "--label-field", "label", "--delimiter", "",
                                        "--limit", str(CHOICE_ITEMS), "--threads", "1", "--output", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for rec, sample in zip(recs, _samples(hf, "neko_next")):
        assert rec["loglikelihoods"] == pytest.approx([x[0][0] for x in sample["resps"]], abs=TOLERANCE)
        assert (rec["metrics"]["acc"], rec["metrics"]["acc_norm"]) == (sample["acc"], sample["acc_norm"])
    assert summary["metrics"]["acc"]["value"] == pytest.approx(hf["results"]["neko_next"]["acc,none"])
    assert summary["metrics"]["acc_norm"]["value"] == pytest.approx(hf["results"]["neko_next"]["acc_norm,none"])


def test_harness_command(task_dir, toolbox_side, one_torch_thread):
    from toolbox.commands.eval import eval_group

    r = CliRunner().invoke(eval_group, ["harness", "neko_next", "--include-path", str(task_dir), "--threads", "1",
                                        "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout[r.stdout.index("{"):])
    assert got["neko_next"]["acc,none"] == toolbox_side["results"]["neko_next"]["acc,none"]


@pytest.mark.slow  # an unknown name is looked up in lm-eval's whole task index (seconds to build)
def test_harness_unknown_task_is_a_one_line_error(task_dir):
    from toolbox.commands.eval import eval_group

    bad = CliRunner().invoke(eval_group, ["harness", "no_such_task", "--include-path", str(task_dir), "--threads", "1"])
    assert bad.exit_code == 1 and bad.output.strip().splitlines()[-1].startswith("Error: lm-eval task 'no_such_task'")
