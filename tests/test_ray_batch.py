"""`toolbox generate --ray`: the Ray Data batch job on a local two-CPU Ray cluster, against the
single-machine `toolbox generate --input` on the same files (greedy, so the records must match)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import REPO, _clean_env

from toolbox.cli import cli

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")

SUBJECTS = ["吾輩は", "主人は", "迷亭君が", "細君は", "寒月君は", "猫が", "先生は", "下女が", "The cat ", "書生は",
            "隣の家の", "三毛子は", "車屋の黒は", "鈴木君が", "雪江さんは"]
PREDICATES = ["朝から", "縁側で", "書斎にこもって", "台所の隅で", "月の夜に", "雨の日には", "ひとりで", "黙って",
              "にこにこして", "茶の間で", "庭を眺めて", "鼻歌まじりに", "あくびをしながら", "not sure why ", "また",
              "急に", "こっそりと", "毎晩", "大きな声で", "静かに"]
GEN = ["--greedy", "--max-new-tokens", "8", "--threads", "1"]
BAD = ['{"prompt": "unterminated', '{"text": "no prompt field"}', '{"prompt": ""}']


def prompts(n: int) -> list[str]:
    return [s + p for s in SUBJECTS for p in PREDICATES][:n]


def write_jsonl(path, texts, bad=()):
    lines = [json.dumps({"id": f"q{i}", "prompt": t}, ensure_ascii=False) for i, t in enumerate(texts)]
    for k, line in enumerate(bad):  # spread the bad records through the file
        lines.insert(7 + 31 * k, line)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def invoke(*args):
    return CliRunner().invoke(cli, ["generate", *args], catch_exceptions=False)


def records(path):
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        record.pop("timings")
        out.append(record)
    return out


def assert_same(got: list[dict], want: list[dict]) -> None:
    """Equal records: the same tokens and text; log-probabilities equal to float32 rounding (the batch a
    prompt shares changes the matrix shapes, so the last digit of a logprob may move; tokens may not)."""
    assert [{**r, "logprobs": None} for r in got] == [{**r, "logprobs": None} for r in want]
    for g, w in zip(got, want):
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-5), g["index"]


def errors(output: str) -> list[str]:
    return sorted(line for line in output.splitlines() if line.startswith("Error: "))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """300 prompts (and three bad records), through the single-machine `toolbox generate --input`."""
    tmp = tmp_path_factory.mktemp("reference")
    src, out = tmp / "prompts.jsonl", tmp / "reference.jsonl"
    write_jsonl(src, prompts(300), BAD)
    result = invoke("--input", str(src), "--output", str(out), *GEN)
    assert result.exit_code == 1, result.output  # the bad records
    assert len(errors(result.output)) == 3
    return src, records(out), errors(result.output)


def test_job_writes_the_records_of_generate_input(cluster, reference, tmp_path):
    src, expected, expected_errors = reference
    out = tmp_path / "ray.jsonl"
    result = invoke("--ray", "--replicas", "2", "--input", str(src), "--output", str(out), *GEN)
    assert result.exit_code == 1, result.output
    assert errors(result.output) == expected_errors  # the same bad records, named the same way
    assert "300 written, 0 already done, 3 failed" in result.output and "rows/s" in result.output
    assert_same(records(out), expected)  # same records, same order (timings aside)


def test_killed_job_resumes_without_writing_anything_twice(cluster, reference, tmp_path):
    src, expected, _ = reference
    out = tmp_path / "resumed.jsonl"
    cmd = [sys.executable, "-m", "toolbox", "generate", "--ray", "--ray-address", cluster, "--batch-size", "1",
           "--input", str(src), "--output", str(out), *GEN]
    job = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.05)
    assert job.poll() is None, job.stderr.read().decode()
    job.send_signal(signal.SIGKILL)
    job.wait()
    job.stderr.close()
    with out.open("a", encoding="utf-8") as f:
        f.write('{"index": 123, "id": "q1')  # what a crash in the middle of a write leaves
    first = records_without_torn(out)
    assert 5 <= len(first) < len(expected)

    result = invoke("--ray", "--input", str(src), "--output", str(out), *GEN)
    assert result.exit_code == 1, result.output
    assert "cut a torn last line" in result.output
    assert f"{len(expected) - len(first)} written, {len(first)} already done, 3 failed" in result.output
    done = records(out)
    indices = [r["index"] for r in done]
    assert len(indices) == len(set(indices))  # nothing written twice
    assert_same(sorted(done, key=lambda r: r["index"]), expected)


def records_without_torn(path):
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines[:-1]]


def test_folder_of_jsonl_csv_parquet_to_parquet_shards_and_rerun(cluster, reference, tmp_path):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    _, expected, _ = reference
    by_prompt = {r["prompt"]: r for r in expected}
    texts = prompts(100)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    write_jsonl(src / "a.jsonl", texts[:40])
    pq.write_table(pa.table({"id": list(range(30)), "prompt": texts[40:70]}), src / "sub" / "b.parquet")
    pcsv.write_csv(pa.table({"prompt": texts[70:100] + [""], "note": ["x"] * 31}), src / "c.csv")
    (src / "_SUCCESS").write_text("")  # markers other tools leave are not inputs
    out = tmp_path / "preds.parquet"

    result = invoke("--ray", "--input", str(src), "--output", str(out), *GEN)
    assert result.exit_code == 1, result.output
    assert errors(result.output) == ["Error: c.csv row 31: field 'prompt' is empty"]
    shards = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert shards == ["a.part-0000.parquet", "c.part-0000.parquet", "sub/b.part-0000.parquet"]
    for name, first, count, ids in (("a", 0, 40, [f"q{i}" for i in range(40)]), ("sub/b", 40, 30, list(range(30))),
                                    ("c", 70, 30, [None] * 30)):
        rows = sorted(pq.read_table(out / f"{name}.part-0000.parquet").to_pylist(), key=lambda r: r["index"])
        assert [r["index"] for r in rows] == list(range(count))  # the row's place in its own file
        assert [r["id"] for r in rows] == ids
        for row, text in zip(rows, texts[first:first + count]):
            want = by_prompt[text]
            assert row["prompt"] == text
            assert (row["text"], row["token_ids"], row["finish_reason"]) == (
                want["text"], want["token_ids"], want["finish_reason"])
            assert row["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5)

    (out / "c.part-0000.parquet").unlink()  # lost
    (out / "a.part-0001.parquet.tmp").write_bytes(b"PAR1 half a shard")  # a run stopped mid-write
    result = invoke("--ray", "--input", str(src), "--output", str(out), *GEN)
    assert "30 written, 70 already done, 1 failed" in result.output
    assert not (out / "a.part-0001.parquet.tmp").exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == shards
