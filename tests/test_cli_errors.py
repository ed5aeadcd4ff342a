"""Every class of bad CLI input gets one `Error:` line and a non-zero exit, never a traceback.

A table of cases, each run through the real command tree (in-process with click's runner,
which re-raises anything that is not a clean exit, so a traceback fails the test), plus a
few that need a real process (stdin bytes, a port in use). Also the inputs that used to
be accepted silently: a padded vocabulary, a torn batch output, NaN weights.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO, _clean_env

from toolbox.cli import cli


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def one_error(result, code: int = 1) -> str:
    """The single error line of a failed command (click's usage errors exit 2 and show the usage)."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_checkpoint):
    """Checkpoint directories, each broken in one way."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("broken")

    def variant(name, change):
        d = root / name
        shutil.copytree(tiny_checkpoint, d)
        change(d)
        return d

    def bad_header(d):
        (d / "model.safetensors").write_bytes(b"\xff\xff\xff\xff\x00\x00\x00\x00{not json")

    def empty(d):
        (d / "model.safetensors").write_bytes(b"")

    def garbage_bin(d):
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"this is not a pickle at all" * 10)

    def wrong_shape(d):
        config = json.loads((d / "config.json").read_text())
        config["intermediate_size"] *= 2
        (d / "config.json").write_text(json.dumps(config))

    def nan_weights(d):
        state = load_file(d / "model.safetensors")
        state = {k: (v.fill_(float("nan")) if "dense_4h_to_h.weight" in k else v) for k, v in state.items()}
        save_file(state, d / "model.safetensors")

    def padded_vocab(d):
        """The vocabulary padded to a multiple of 64 past the tokenizer's 8000, the tail made most likely."""
        state = load_file(d / "model.safetensors")
        for key in ("gpt_neox.embed_in.weight", "embed_out.weight"):
            w = state[key]
            extra = torch.zeros(64, w.shape[1]) if "embed_in" in key else torch.full((64, w.shape[1]), 0.5)
            state[key] = torch.cat([w, extra.to(w.dtype)])
        save_file(state, d / "model.safetensors")
        config = json.loads((d / "config.json").read_text())
        config["vocab_size"] += 64
        (d / "config.json").write_text(json.dumps(config))

    cases = dict(bad_header=bad_header, empty=empty, garbage_bin=garbage_bin, wrong_shape=wrong_shape,
                 nan_weights=nan_weights, padded_vocab=padded_vocab)
    return {name: variant(name, change) for name, change in cases.items()}


@pytest.mark.parametrize("kind, words", [
    ("bad_header", "cannot load"), ("empty", "cannot load"), ("garbage_bin", "cannot load"),
    ("wrong_shape", "config.json implies"),
])
@pytest.mark.parametrize("command", [["generate", "x"], ["score", "-t", "猫です"], ["generate", "-b", "quant", "x"],
                                     ["score", "--compare", "quant", "-t", "猫"]])
def test_broken_weights(broken, kind, words, command):
    error = one_error(run(*command, "-m", str(broken[kind])))
    assert words in error and str(broken[kind]) in error


def test_nan_weights_are_reported_not_scored(broken):
    error = one_error(run("score", "-t", "吾輩は猫である。", "-m", str(broken["nan_weights"])))
    assert "NaN" in error
    error = one_error(run("generate", "--greedy", "--max-new-tokens", "8", "x", "-m", str(broken["nan_weights"])))
    assert "finite" in error


def test_a_padded_vocabulary_never_emits_ids_the_tokenizer_lacks(broken):
    result = run("generate", "--json", "--max-new-tokens", "12", "--temperature", "1", "--seed", "3", "猫",
                 "-m", str(broken["padded_vocab"]))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert len(record["token_ids"]) == 12 and max(record["token_ids"]) < 8000


BAD_OPTIONS = [
    (["generate", "--temperature", "nan", "x"], "--temperature"),
    (["generate", "--top-p", "nan", "x"], "--top-p"),
    (["generate", "--repetition-penalty", "inf", "x"], "--repetition-penalty"),
    (["generate", "--seed", str(2**70), "x"], "--seed"),
    (["generate", "--min-new-tokens", "9", "--max-new-tokens", "4", "x"], "--min-new-tokens"),
    (["generate", "--threads", "10000", "x"], "--threads"),
    (["generate", "-o", "compile", "x"], "--option"),
    (["generate", "-o", "nope=1", "x"], "nope"),
    (["score", "--window", "1", "-t", "x"], "--window"),
    (["score", "--stride", "100000", "-t", "x"], "--stride"),
    (["inspect-bytes", "--summary", "--top", "-5", "x"], "--top"),
    (["tokenize", "--revision", "main", "-m", "embedded", "x"], "--revision"),
    (["download", ""], "NAME"),
    (["chat", "--max-new-tokens", "100000"], "--max-new-tokens"),
    (["generate", "--max-new-tokens", "100000", "x"], "--max-new-tokens"),
]


@pytest.mark.parametrize("args, names", BAD_OPTIONS, ids=[" ".join(a[:3]) for a, _ in BAD_OPTIONS])
def test_bad_options_name_the_option(args, names):
    result = run(*args)
    assert result.exit_code in (1, 2), result.output
    error = one_error(result, result.exit_code)
    assert names in error, error


def test_missing_directory_and_missing_output_directory(tmp_path, broken):
    error = one_error(run("generate", "-m", "/no/such/dir", "x"))
    assert "no such directory" in error
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "猫"}\n')
    # the output's directory is checked before anything loads: even a broken model is not reached
    error = one_error(run("generate", "-m", str(broken["bad_header"]), "--input", str(prompts),
                          "--output", str(tmp_path / "nowhere" / "o.jsonl")))
    assert "does not exist" in error and "--output" in error


def test_inspect_bytes_summary_reads_its_argument():
    result = run("inspect-bytes", "--summary", "--json", "寿司🍣")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["characters"] == 3


def test_offline_download_says_what_to_do(tmp_path):
    proc = real("download", "sft", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0]
    # not the advice for other commands: to run this very command again, or an option it lacks
    assert "toolbox download" not in lines[0] and "--model" not in lines[0]


def test_torn_batch_output_is_repaired_before_appending(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("猫", "犬", "鳥")), encoding="utf-8")
    out = tmp_path / "o.jsonl"
    result = run("generate", "--greedy", "--max-new-tokens", "4", "--input", str(prompts), "--output", str(out))
    assert result.exit_code == 0, result.output
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.index(b"\n") + 1] + whole[whole.index(b"\n") + 1:][:20])  # a crash mid-write
    result = run("generate", "--greedy", "--max-new-tokens", "4", "--input", str(prompts), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "torn" in result.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    assert out.read_bytes().startswith(whole[: whole.index(b"\n") + 1])


def real(*args, input: bytes | None = None, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "toolbox", *args], input=input, capture_output=True,
                          env=_clean_env(**(env or {})), cwd=REPO, timeout=120)


def test_chat_with_invalid_utf8_or_binary_input():
    proc = real("chat", "--max-new-tokens", "2", input=b"\xff\xfe\x00binary\n")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert b"invalid UTF-8" in proc.stderr and b"line 1" in proc.stderr


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = real("serve", "--port", str(port))
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and lines == [lines[-1]] and lines[0].startswith("Error: --port"), lines
