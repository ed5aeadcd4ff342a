"""`toolbox generate` and `toolbox chat` end to end, on a small random checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner
from runtime_fixtures import TINY_CONTEXT as CONTEXT

from toolbox.cli import cli


def run(args, input=None):
    return CliRunner().invoke(cli, args, input=input, catch_exceptions=False)


def gen_json(ckpt, *args, input=None):
    result = run(["generate", "-m", str(ckpt), "--json", *args], input=input)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def sp(ckpt):
    return spm.SentencePieceProcessor(model_file=str(ckpt / "spiece.model"))


def hf_greedy(ckpt, prompt_ids, max_new):
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_ids_match_transformers_and_text_matches_sentencepiece(tiny_checkpoint):
    prompt = "吾輩は猫である。"
    [rec] = gen_json(tiny_checkpoint, prompt, "--greedy", "--max-new-tokens", "24")
    ids = sp(tiny_checkpoint).encode(prompt)
    assert rec["prompt_tokens"] == len(ids)
    assert rec["token_ids"] == hf_greedy(tiny_checkpoint, ids, 24)
    body = [t for t in rec["token_ids"] if t != 3]
    assert rec["text"] == sp(tiny_checkpoint).decode(body)
    assert rec["finish_reason"] in ("length", "stop")
    assert len(rec["logprobs"]) == len(rec["token_ids"]) and all(lp <= 0 for lp in rec["logprobs"])
    assert rec["timings"]["total_s"] > 0


def test_streamed_text_equals_json_text(tiny_checkpoint):
    args = ["-m", str(tiny_checkpoint), "猫", "--greedy", "--max-new-tokens", "16"]
    plain = run(["generate", *args])
    [rec] = gen_json(tiny_checkpoint, "猫", "--greedy", "--max-new-tokens", "16")
    assert plain.exit_code == 0
    assert plain.stdout == rec["text"] + "\n"


def test_seeded_sampling_is_reproducible(tiny_checkpoint):
    args = ("猫", "--temperature", "1.0", "--max-new-tokens", "16")
    a = gen_json(tiny_checkpoint, *args, "--seed", "7")
    b = gen_json(tiny_checkpoint, *args, "--seed", "7")
    c = gen_json(tiny_checkpoint, *args, "--seed", "8")
    assert a[0]["token_ids"] == b[0]["token_ids"]
    assert a[0]["token_ids"] != c[0]["token_ids"]


def test_n_samples(tiny_checkpoint):
    recs = gen_json(tiny_checkpoint, "猫", "-n", "3", "--temperature", "1", "--seed", "1", "--max-new-tokens", "8")
    assert [r["sample"] for r in recs] == [0, 1, 2]
    assert len({tuple(r["token_ids"]) for r in recs}) > 1


def test_stop_string_cuts_the_text(tiny_checkpoint):
    [full] = gen_json(tiny_checkpoint, "猫", "--greedy", "--max-new-tokens", "40", "--min-new-tokens", "40")
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    [cut] = gen_json(tiny_checkpoint, "猫", "--greedy", "--max-new-tokens", "40", "--stop", stop)
    assert cut["text"] == text[: text.find(stop)]
    assert cut["finish_reason"] == "stop"


def test_stdin_lines_are_prompts_and_empty_lines_skipped(tiny_checkpoint):
    recs = gen_json(tiny_checkpoint, "--greedy", "--max-new-tokens", "4", input="猫\n\n犬\n")
    assert [r["prompt"] for r in recs] == ["猫", "犬"]
    assert [r["prompt_index"] for r in recs] == [0, 2]


def test_prompt_longer_than_context(tiny_checkpoint):
    long = "吾輩は猫である。" * 40
    result = run(["generate", "-m", str(tiny_checkpoint), long, "--max-new-tokens", "8"])
    assert result.exit_code == 1
    assert "context" in result.stderr and "--truncate left" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    [rec] = gen_json(tiny_checkpoint, long, "--max-new-tokens", "8", "--truncate", "left", "--greedy")
    assert rec["prompt_tokens"] == CONTEXT - 8


@pytest.mark.parametrize(
    "args",
    [["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-k", "-3"],
     ["--repetition-penalty", "0"], ["--max-new-tokens", "0"], ["-n", "0"]],
)
def test_invalid_sampling_values_are_usage_errors(tiny_checkpoint, args):
    result = run(["generate", "-m", str(tiny_checkpoint), "猫", *args])
    assert result.exit_code == 2
    assert "Invalid value" in result.stderr


def test_unavailable_backend_names_the_available_ones(tiny_checkpoint):
    result = run(["generate", "-m", str(tiny_checkpoint), "猫", "--backend", "cuda"])
    assert result.exit_code == 1
    assert "not available (no CUDA device)" in result.stderr and "cpu" in result.stderr


def test_instruction_template_applied(tiny_checkpoint):
    [rec] = gen_json(tiny_checkpoint, "元気？", "--prompt-format", "rinna-chat", "--max-new-tokens", "2")
    assert rec["prompt_tokens"] == len(sp(tiny_checkpoint).encode("ユーザー: 元気？<NL>システム: "))


def test_batch_file_is_batched_resumable_and_reports_bad_records(tiny_checkpoint, tmp_path):
    prompts = ["猫", "吾輩は", "名前はまだ無い", "どこで生れたか"]
    lines = [json.dumps({"prompt": p, "id": f"r{i}"}, ensure_ascii=False) for i, p in enumerate(prompts)]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"text": "no prompt field"}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["generate", "-m", str(tiny_checkpoint), "--input", str(src), "--output", str(out),
            "--greedy", "--max-new-tokens", "6", "--batch-size", "3"]
    first = run(args)
    assert first.exit_code == 1
    assert "in.jsonl line 3: invalid JSON" in first.stderr
    assert "in.jsonl line 5: field 'prompt' missing" in first.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["r0", "r1", "r2", "r3"]
    for r in records:  # batched (ragged) results equal one-at-a-time greedy runs
        [alone] = gen_json(tiny_checkpoint, r["prompt"], "--greedy", "--max-new-tokens", "6")
        assert r["token_ids"] == alone["token_ids"]
    again = run(args)
    assert "0 written, 4 already done, 2 failed" in again.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4


def test_ctrl_c_keeps_partial_output(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("猫\n" * 200, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolbox", "generate", "-m", str(tiny_checkpoint), "--max-new-tokens", "90",
         "--min-new-tokens", "90", "--seed", "1", "--threads", "1"],
        stdin=prompts.open("rb"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    first = proc.stdout.read(3)  # wait for streamed output
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert first and b"Traceback" not in err and b"interrupted" in err


def test_chat_session(tiny_checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "toolbox", "chat", "-m", str(tiny_checkpoint), "--max-new-tokens", "5", "--seed", "0"],
        input="こんにちは\n/reset\n元気？\n/exit\n".encode(), capture_output=True, timeout=120,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.count("システム>") == 2 and "conversation reset" in out
