"""Eval data, task files and bad input, through the `eval` command (no model is loaded:
predictions files, or errors raised before the model loads)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, _clean_env

from toolbox.commands.eval import eval_group

DATA = Path(__file__).parent / "data" / "eval"
SUMMARY = [json.loads(line) for line in (DATA / "neko_summary.jsonl").read_text(encoding="utf-8").splitlines()]


def invoke(*args, env=None):
    return CliRunner().invoke(eval_group, [str(a) for a in args], env=env)


def predictions(tmp_path, rows=None, name="preds.jsonl") -> Path:
    """Summary records with a prediction beside the data's fields (every other one exact)."""
    rows = rows if rows is not None else [
        {**r, "prediction": r["first_sentence"] if i % 2 == 0 else r["paragraph"][-20:]} for i, r in enumerate(SUMMARY)
    ]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def score(path, *extra):
    r = invoke("generate", "--predictions", path, "--reference-field", "first_sentence", "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def one_line_error(result) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_predictions_scored_without_a_model(tmp_path):
    s = score(predictions(tmp_path))
    assert s["items"] == 24 and s["invalid_skipped"] == 0
    assert s["metrics"]["exact_match"]["value"] == pytest.approx(0.5)
    assert s["metric_tokenizer"]["reason"].startswith("auto: Japanese text")
    assert s["model"].startswith("predictions from")
    lo, hi = s["metrics"]["rouge1"]["ci95"]
    assert lo < s["metrics"]["rouge1"]["value"] < hi


def test_csv_tsv_parquet_and_jsonl_give_the_same_summary(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = predictions(tmp_path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for name, delimiter in (("p.csv", ","), ("p.tsv", "\t")):
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
            w.writeheader()
            w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    want = score(path)["metrics"]
    for name in ("p.csv", "p.tsv", "p.parquet"):
        assert score(tmp_path / name)["metrics"] == want, name


def test_hf_dataset_from_a_local_directory(tmp_path):
    """`--dataset` reads through Hugging Face datasets; a local dataset directory needs no hub."""
    pytest.importorskip("datasets")
    ds = tmp_path / "neko_ds"
    ds.mkdir()
    rows = SUMMARY[:5]
    (ds / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    from toolbox.eval import data

    records = list(data.read_dataset(str(ds), "test"))
    assert [r.fields for r in records] == rows
    assert records[0].where == f"{ds} split test row 1"
    r = invoke("generate", "--dataset", ds, "--reference-field", "first_sentence", "--predictions", ds / "test.jsonl")
    assert r.exit_code == 2 and "--predictions is the data" in r.output


def test_hf_hub_dataset_offline_is_a_one_line_error(tmp_path):
    """HF_DATASETS_OFFLINE is read when `datasets` is imported, so this runs in a fresh process."""
    pytest.importorskip("datasets")
    env = {**_clean_env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = ["generate", "--dataset", "abisee/cnn_dailymail:3.0.0", "--split", "test", "--input-field", "article",
            "--reference-field", "highlights"]
    p = subprocess.run([sys.executable, "-c", "from toolbox.commands.eval import eval_group; eval_group()", *args],
                       capture_output=True, env=env, cwd=REPO, timeout=120)
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr.decode()
    assert lines[0].startswith("Error: dataset abisee/cnn_dailymail:3.0.0 split test: cannot load")
    assert "HF_DATASETS_OFFLINE" in lines[0]


def test_limit_and_seeded_shuffle(tmp_path):
    path = predictions(tmp_path)

    def keys(*extra):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}.jsonl"
        r = invoke("generate", "--predictions", path, "--reference-field", "first_sentence", "--id-field", "id",
                   "--output", out, *extra)
        assert r.exit_code == 0, r.output
        return [json.loads(line)["key"] for line in out.read_text(encoding="utf-8").splitlines()]

    assert keys("--limit", "5") == [r["id"] for r in SUMMARY[:5]]
    shuffled = keys("--shuffle", "--seed", "7", "--limit", "5")
    assert shuffled == keys("--shuffle", "--seed", "7", "--limit", "5")
    assert shuffled != keys("--limit", "5") and shuffled != keys("--shuffle", "--seed", "8", "--limit", "5")
    assert set(shuffled) <= {r["id"] for r in SUMMARY}


BAD_JSONL = [
    ('{"id": "a", "first_sentence": "猫。", "prediction": "猫。"}\n{"id": "b", "prediction": "x"}\n',
     "line 2: no field 'first_sentence' (fields: id, prediction)"),
    ('{"id": "a", "first_sentence": "  ", "prediction": "猫。"}\n', "line 1: field 'first_sentence' is empty"),
    ('{"id": "a", "first_sentence": "猫", "prediction": "猫"}\n{"id": "b", "first_sentence": \n',
     "line 2: not JSON"),
    ('["not", "an", "object"]\n', "line 1: expected a JSON object, got list"),
    ('{"id": "a", "first_sentence": ["x"], "prediction": "猫"}\n', "line 1: field 'first_sentence' is not text"),
    ('{"id": "a", "first_sentence": "猫", "prediction": "猫"}\n{"id": "a", "first_sentence": "犬", "prediction": "x"}\n',
     "line 2: duplicate id 'a'"),
]


@pytest.mark.parametrize("content, message", BAD_JSONL, ids=["missing", "empty", "json", "object", "type", "dup"])
def test_bad_records_are_one_line_errors_naming_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    line = one_line_error(invoke("generate", "--predictions", path, "--reference-field", "first_sentence",
                                 "--id-field", "id"))
    assert f"{path} {message}" in line


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"first_sentence": "ok", "prediction": "ok"}\n{"first_sentence": "\xff", "prediction": "x"}\n')
    assert f"{path} line 2: invalid UTF-8" in one_line_error(
        invoke("generate", "--predictions", path, "--reference-field", "first_sentence"))


def test_csv_row_with_wrong_column_count(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("first_sentence,prediction\n猫。,猫。\n犬。,犬。,extra\n", encoding="utf-8")
    assert f"{path} line 3: 3 columns, the header has 2" in one_line_error(
        invoke("generate", "--predictions", path, "--reference-field", "first_sentence"))


def test_skip_invalid_counts_and_reports(tmp_path):
    rows = [dict(r, prediction=r["first_sentence"]) for r in SUMMARY[:6]]
    rows[1].pop("first_sentence")
    rows[4]["first_sentence"] = ""
    path = predictions(tmp_path, rows)
    r = invoke("generate", "--predictions", path, "--reference-field", "first_sentence", "--json", "--skip-invalid")
    assert r.exit_code == 0
    summary = json.loads(r.stdout)
    assert (summary["items"], summary["invalid_skipped"], summary["records_in_source"]) == (4, 2, 6)
    assert "line 2: no field 'first_sentence'" in r.stderr and "line 5: field 'first_sentence' is empty" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--data", "nowhere.jsonl"], "nowhere.jsonl: no such file"),
    (["--data", "{here}/x.txt"], "unknown data format '.txt'"),
    (["--data", "{neko}"], "no field 'question'"),
    (["--data", "{neko}", "--template", "{paragraph"], "template '{paragraph'"),
], ids=["missing-file", "format", "field", "template"])
def test_bad_data_options_are_one_line_errors(tmp_path, args, message):
    (tmp_path / "x.txt").write_text("x", encoding="utf-8")
    args = [a.replace("{here}", str(tmp_path)).replace("{neko}", str(DATA / "neko_summary.jsonl")) for a in args]
    r = invoke("generate", *args, "--input-field", "question", "--reference-field", "first_sentence")
    assert message in one_line_error(r)


def test_choice_data_errors(tmp_path):
    rows = [{"q": "吾輩は", "choices": ["猫", "犬"], "label": 5}]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    base = ["choice", "--data", path, "--input-field", "q", "--label-field", "label"]
    assert "line 1: field 'label': label 5 is outside 0..1" in one_line_error(invoke(*base, "--choices-field", "choices"))
    assert "no field 'opts'" in one_line_error(invoke(*base, "--choices-field", "opts"))
    assert "--choices-field" in one_line_error(invoke("choice", "--data", path, "--input-field", "q",
                                                      "--label-field", "label"))
    rows[0].update(label="鳥")
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert "'鳥' is neither a choice index nor one of the choices" in one_line_error(
        invoke(*base, "--choices-field", "choices"))


def test_task_files_yaml_and_toml(tmp_path):
    preds = predictions(tmp_path)
    (tmp_path / "t.yaml").write_text(
        "kind: generate\ndata: preds.jsonl\nreference_field: first_sentence\ntemplate: '{paragraph}'\n"
        "metrics: [rouge1, exact_match]\nmetric_tokenizer: char\n", encoding="utf-8")
    (tmp_path / "t.toml").write_text(
        'kind = "generate"\ndata = "preds.jsonl"\nreference_field = "first_sentence"\ntemplate = "{paragraph}"\n'
        'metrics = ["rouge1", "exact_match"]\nmetric_tokenizer = "char"\n', encoding="utf-8")
    from toolbox.eval.tasks import load_task

    yaml_task, toml_task = load_task(str(tmp_path / "t.yaml")), load_task(str(tmp_path / "t.toml"))
    assert yaml_task.data == toml_task.data == str(preds)  # relative to the task file
    assert yaml_task.metric_names == ("rouge1", "exact_match") and yaml_task.name == "t"
    want = score(preds, "--metric", "rouge1", "--metric", "exact_match", "--metric-tokenizer", "char")["metrics"]
    from toolbox.eval import data, runner
    from toolbox.eval.tasks import item_builder

    loaded = data.load(data.read_file(preds), "p", item_builder(yaml_task, predictions=True))
    result = runner.run(yaml_task, loaded.items, None, runner.RunOptions(progress=False))
    assert [r["metrics"]["exact_match"] for r in result.records] == [1.0 - i % 2 for i in range(24)]
    assert want["exact_match"]["value"] == pytest.approx(0.5)


@pytest.mark.parametrize("content, suffix, message", [
    ("kind: generate\nbogus: 1\n", ".yaml", "unknown key 'bogus'"),
    ("kind: [generate\n", ".yaml", "not valid YAML"),
    ('kind = "generate"\nlimit = "ten"\n', ".toml", "'limit' should be a int, got str"),
    ("kind: classify\n", ".yaml", "kind 'classify'"),
    ("kind: generate\ndata: x.jsonl\nreference_field: r\ninput_field: p\nmetrics: [bleurt]\n", ".yaml",
     "metric 'bleurt' is not a generate metric"),
    ("kind: generate\ndata: x.jsonl\nreference_field: r\ninput_field: p\ngeneration: {beams: 4}\n", ".yaml",
     "unknown generation setting 'beams'"),
    ("kind: generate\ngeneration: {temperature: hot}\n", ".yaml", "generation setting 'temperature' should be a number"),
], ids=["key", "yaml", "type", "kind", "metric", "generation", "generation-type"])
def test_bad_task_files_are_one_line_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"task{suffix}"
    path.write_text(content, encoding="utf-8")
    line = one_line_error(invoke("run", path))
    assert message in line and ("task" in line)


def test_builtin_tasks_listed_and_loadable():
    r = invoke("run")
    assert r.exit_code == 0
    assert {line.split("\t")[0] for line in r.output.splitlines()} >= {"cnn_dailymail", "xlsum_ja"}
    from toolbox.eval.tasks import load_task

    cnn = load_task("cnn_dailymail").check()
    assert (cnn.input_field, cnn.reference_field, cnn.kind) == ("article", "highlights", "generate")
    assert load_task("xlsum_ja").check().reference_field == "summary"
    assert "no such file or built-in task" in one_line_error(invoke("run", "no_such_task"))


def test_compare_two_runs(tmp_path):
    base = [dict(r, prediction=r["first_sentence"]) for r in SUMMARY[:6]]
    worse = [dict(r, prediction=r["first_sentence"] if i < 3 else "吾輩") for i, r in enumerate(SUMMARY[:6])]
    outs = []
    for name, rows in (("a", base), ("b", worse)):
        out = tmp_path / f"{name}.out.jsonl"
        r = invoke("generate", "--predictions", predictions(tmp_path, rows, f"{name}.jsonl"), "--reference-field",
                   "first_sentence", "--id-field", "id", "--output", out, "--metric-tokenizer", "char")
        assert r.exit_code == 0, r.output
        outs.append(out)
    r = invoke("compare", *outs, "--json")
    assert r.exit_code == 0, r.output
    c = json.loads(r.output)
    em = c["metrics"]["exact_match"]
    assert (c["items"], em["a"], em["b"], em["wins"], em["ties"], em["losses"]) == (6, 1.0, 0.5, 0, 3, 3)
    assert em["diff"] == pytest.approx(-0.5) and em["ci95"][1] < 0
    assert c["metrics"]["bleu"]["b"] < c["metrics"]["bleu"]["a"] == pytest.approx(100.0)
    table = invoke("compare", *outs)
    assert "exact_match" in table.output and "B wins" in table.output


def test_compare_refuses_different_items_and_tokenizers(tmp_path):
    outs = {}
    for name, rows, tok in (("a", SUMMARY[:3], "char"), ("b", SUMMARY[3:6], "char"), ("c", SUMMARY[:3], "whitespace")):
        out = tmp_path / f"{name}.out.jsonl"
        rows = [dict(r, prediction="猫") for r in rows]
        invoke("generate", "--predictions", predictions(tmp_path, rows, f"{name}.jsonl"), "--reference-field",
               "first_sentence", "--output", out, "--metric-tokenizer", tok)
        outs[name] = out
    assert "has another reference" in one_line_error(invoke("compare", outs["a"], outs["b"]))
    assert "different metric tokenizers" in one_line_error(invoke("compare", outs["a"], outs["c"]))
    (tmp_path / "junk.jsonl").write_text("{}\n", encoding="utf-8")
    assert "line 1: not an eval record" in one_line_error(invoke("compare", outs["a"], tmp_path / "junk.jsonl"))


def test_scoring_predictions_imports_no_torch(tmp_path):
    """`eval --help` and scoring a predictions file stay light: no torch, transformers or lm-eval."""
    probe = ("import sys; from toolbox.commands.eval import eval_group\n"
             "try:\n    eval_group(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('LOADED', [m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules], code)")
    path = predictions(tmp_path)
    for args in (["--help"], ["generate", "--predictions", str(path), "--reference-field", "first_sentence"]):
        p = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, env=_clean_env(), cwd=REPO,
                           timeout=120)
        assert p.stdout.decode().strip().splitlines()[-1] in ("LOADED [] 0", "LOADED [] None"), p.stderr.decode()


def test_english_predictions_use_words_and_match_rouge_score(tmp_path):
    """English references pick the word tokenizer, whose ROUGE is rouge-score's own on such text."""
    from rouge_score import rouge_scorer

    rows = [json.loads(line) for line in (DATA / "botchan_summary.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [dict(r, prediction=" ".join(r["paragraph"].split()[:12])) for r in rows]
    out = tmp_path / "en.jsonl"
    r = invoke("generate", "--predictions", predictions(tmp_path, rows), "--reference-field", "first_sentence",
               "--output", out, "--json")
    summary = json.loads(r.stdout)
    assert summary["metric_tokenizer"]["name"] == "whitespace"
    assert summary["metric_tokenizer"]["bleu_tokenize"] == "13a"
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for rec, row in zip((json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()), rows):
        want = scorer.score(row["first_sentence"], row["prediction"])
        assert {k: rec["metrics"][k] for k in want} == {k: pytest.approx(v.fmeasure) for k, v in want.items()}
