"""`toolbox eval --endpoint`: a real `toolbox serve` process as the model, against the same
model in process; and `toolbox serve` as lm-eval's `local-completions` target."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from serve_fixtures import SERVED_NAME, ServerProcess, embedded_weights

from toolbox.commands.eval import eval_group
from toolbox.registry import EMBEDDED_DIR

pytestmark = pytest.mark.skipif(not embedded_weights(), reason="no embedded weights")
pytest.importorskip("httpx")

DATA = Path(__file__).parent / "data" / "eval"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(str(EMBEDDED_DIR)).wait_ready()
    yield s
    s.stop()


def run(tmp_path, name, *args) -> list[dict]:
    out = tmp_path / f"{name}.jsonl"
    r = CliRunner().invoke(eval_group, [*map(str, args), "--output", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def both(tmp_path, server, *args):
    local = run(tmp_path, "local", *args)
    remote = run(tmp_path, "remote", *args, "--endpoint", server.url)
    return local, remote


def test_generation_over_the_endpoint_equals_local(tmp_path, server, one_torch_thread):
    local, remote = both(tmp_path, server, "generate", "--data", DATA / "neko_summary.jsonl", "--template",
                         "{paragraph}\\n要約：", "--reference-field", "first_sentence", "--limit", "3",
                         "--max-new-tokens", "12", "--stop", "。")
    assert [r["prediction"] for r in remote] == [r["prediction"] for r in local]
    assert [r["metrics"] for r in remote] == [r["metrics"] for r in local]


def test_choice_over_the_endpoint_equals_local(tmp_path, server, one_torch_thread):
    local, remote = both(tmp_path, server, "choice", "--data", DATA / "neko_next.jsonl", "--input-field", "context",
                         "--choices-field", "choices", "--label-field", "label", "--delimiter", "", "--limit", "4")
    for a, b in zip(local, remote):
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=TOLERANCE)
        assert b["metrics"] == a["metrics"]


def test_perplexity_over_the_endpoint_equals_local(tmp_path, server, one_torch_thread):
    local, remote = both(tmp_path, server, "perplexity", "--data", DATA / "neko_summary.jsonl", "--text-field",
                         "paragraph", "--limit", "3")
    assert [r["tokens"] for r in remote] == [r["tokens"] for r in local]
    assert [r["nll"] for r in remote] == pytest.approx([r["nll"] for r in local], abs=TOLERANCE)


def test_unreachable_endpoint_is_a_one_line_error(tmp_path):
    from serve_fixtures import free_port

    r = CliRunner().invoke(eval_group, ["perplexity", "--data", str(DATA / "neko_summary.jsonl"), "--text-field",
                                        "paragraph", "--endpoint", f"http://127.0.0.1:{free_port()}"])
    assert r.exit_code == 1
    (line,) = r.output.strip().splitlines()
    assert line.startswith("Error: --endpoint http://127.0.0.1:") and "ConnectError" in line


def test_serve_as_lm_eval_local_completions(tmp_path, server, one_torch_thread):
    """lm-eval's own OpenAI-completions client scores through echo + logprobs; its log-likelihoods
    equal the toolbox adapter's in process."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need it (lm-eval[api])
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import toolbox
    from toolbox.eval.harness import run_harness
    from toolbox.hf_tokenizer import write_tokenizer_files

    rows = [json.loads(line) for line in (DATA / "neko_next.jsonl").read_text(encoding="utf-8").splitlines()][:4]
    (tmp_path / "next.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    (tmp_path / "neko_next.yaml").write_text(
        f"task: neko_next\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'next.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n", encoding="utf-8")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(EMBEDDED_DIR / "config.json", tok_dir)
    write_tokenizer_files(tok_dir, EMBEDDED_DIR / "spiece.model")
    remote = simple_evaluate(
        model="local-completions",
        model_args={"model": SERVED_NAME, "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": str(tok_dir), "max_length": 512, "batch_size": 4},
        tasks=["neko_next"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True, bootstrap_iters=0)
    local = run_harness(toolbox.load(threads=1), ["neko_next"], include_path=str(tmp_path), log_samples=True)
    for a, b in zip(sorted(local["samples"]["neko_next"], key=lambda s: s["doc_id"]),
                    sorted(remote["samples"]["neko_next"], key=lambda s: s["doc_id"])):
        assert [x[0][0] for x in b["resps"]] == pytest.approx([x[0][0] for x in a["resps"]], abs=TOLERANCE)
    assert remote["results"]["neko_next"]["acc,none"] == local["results"]["neko_next"]["acc,none"]
