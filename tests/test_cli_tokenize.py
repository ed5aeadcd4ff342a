"""The tokenizer commands end to end: tokenize, detokenize, inspect-bytes, models, download.

Expected values come from sentencepiece itself (`sp_ref`, `nfkc_sp`) or are computed
independently here; in-process runs use click's CliRunner, and real processes are
used where pipes, exit codes, stderr and the environment matter.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import unicodedata
from collections import Counter

import pytest
from conftest import EMBEDDED_MODEL, REPO, SAMPLE_BYTES, SAMPLE_LINES, SAMPLE_TEXT, _clean_env, fake_hub_cache

SERIES = {
    "rinna/japanese-gpt-neox-3.6b": "3.6b",
    "rinna/japanese-gpt-neox-3.6b-instruction-sft": "sft",
    "rinna/japanese-gpt-neox-3.6b-instruction-sft-v2": "sft-v2",
    "rinna/japanese-gpt-neox-3.6b-instruction-ppo": "ppo",
}


def out_lines(data: bytes) -> list[str]:
    """stdout as lines; every output line ends with a newline."""
    text = data.decode("utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def ids_line(ids) -> str:
    return " ".join(map(str, ids))


def one_line_error(stderr: bytes | str) -> str:
    """The error a user sees: exactly one line, no traceback."""
    text = stderr.decode("utf-8") if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def fallback_chars(sp, text: str) -> list[str]:
    """Characters sentencepiece writes as <0xNN> pieces, read from the ids alone."""
    chars, run = [], b""
    for i in sp.encode(text):
        if sp.is_byte(i):
            run += bytes([int(sp.id_to_piece(i)[3:5], 16)])
            continue
        chars += run.decode("utf-8")
        run = b""
    return chars + list(run.decode("utf-8"))


# -- tokenize ------------------------------------------------------------------------


def test_tokenize_argument_in_every_format(invoke, sp_ref):
    text = "吾輩は猫🍣である"
    r = invoke("tokenize", text)
    assert r.exit_code == 0
    assert r.stdout == " ".join(sp_ref.encode(text, out_type=str)) + "\n"
    r = invoke("tokenize", "--format", "ids", text)
    assert r.stdout == ids_line(sp_ref.encode(text)) + "\n"
    for flags in (["--format", "json"], ["--json"]):
        data = json.loads(invoke("tokenize", *flags, text).stdout)
        assert data["ids"] == sp_ref.encode(text)
        assert data["pieces"] == sp_ref.encode(text, out_type=str)
        assert len(data["spans"]) == len(data["ids"])


def test_tokenize_stdin_one_output_line_per_input_line(invoke, sp_ref):
    r = invoke("tokenize", "--format", "ids", input=SAMPLE_BYTES)
    assert r.exit_code == 0
    assert out_lines(r.stdout_bytes) == [ids_line(sp_ref.encode(line)) for line in SAMPLE_LINES]
    pieces = out_lines(invoke("tokenize", input=SAMPLE_BYTES).stdout_bytes)
    assert pieces == [" ".join(sp_ref.encode(line, out_type=str)) for line in SAMPLE_LINES]
    assert pieces.count("") == SAMPLE_LINES.count("")  # empty lines stay, as empty lines


def test_crlf_is_a_line_end_but_a_lone_cr_is_text(invoke, sp_ref):
    crlf = invoke("tokenize", "--format", "ids", input="猫\r\n犬\r\n".encode())
    lf = invoke("tokenize", "--format", "ids", input="猫\n犬\n".encode())
    assert crlf.stdout == lf.stdout == f"{ids_line(sp_ref.encode('猫'))}\n{ids_line(sp_ref.encode('犬'))}\n"
    r = invoke("tokenize", "--format", "ids", input=b"a\rb\n")
    assert r.stdout == ids_line(sp_ref.encode("a\rb")) + "\n"


def test_whole_keeps_line_ends(invoke, sp_ref):
    r = invoke("tokenize", "--whole", "--format", "ids", input=SAMPLE_BYTES)
    assert out_lines(r.stdout_bytes) == [ids_line(sp_ref.encode(SAMPLE_TEXT))]
    ids = sp_ref.encode(SAMPLE_TEXT)
    assert sp_ref.piece_to_id("<0x0D>") in ids and sp_ref.piece_to_id("<0x0A>") in ids


def test_nl_convention_both_ways(invoke, sp_ref):
    nl_id = sp_ref.piece_to_id("<NL>")
    r = invoke("tokenize", "--whole", "--nl", "--format", "ids", input="質問\n答え".encode())
    assert r.stdout == ids_line(sp_ref.encode("質問<NL>答え")) + "\n"
    assert nl_id in sp_ref.encode("質問<NL>答え")
    without = invoke("tokenize", "--whole", "--format", "ids", input="質問\n答え".encode())
    assert str(nl_id) not in without.stdout.split()

    ids = ids_line(sp_ref.encode("質問<NL>答え"))
    assert invoke("detokenize", "--nl", ids).stdout == "質問\n答え\n"
    assert invoke("detokenize", ids).stdout == "質問<NL>答え\n"


def test_json_spans_are_utf8_byte_offsets(invoke, sp_ref):
    r = invoke("tokenize", "--json", input=SAMPLE_BYTES)
    for line, out in zip(SAMPLE_LINES, out_lines(r.stdout_bytes), strict=True):
        data = json.loads(out)
        raw = line.encode("utf-8")
        assert data["ids"] == sp_ref.encode(line)
        assert b"".join(raw[s:e] for s, e in data["spans"]) == raw
        pos = 0
        for piece, (s, e) in zip(data["pieces"], data["spans"]):
            assert s == pos
            pos = e
            if not piece.startswith("<0x"):
                assert raw[s:e].decode("utf-8") == piece.replace("\u2581", " ")
        assert pos == len(raw)

    whole = json.loads(invoke("tokenize", "--json", "--whole", input=SAMPLE_BYTES).stdout)
    assert b"".join(SAMPLE_BYTES[s:e] for s, e in whole["spans"]) == SAMPLE_BYTES


def test_json_spans_under_nl_point_at_the_newline(invoke, sp_ref):
    raw = "一\n二".encode()
    data = json.loads(invoke("tokenize", "--json", "--whole", "--nl", input=raw).stdout)
    assert data["ids"] == sp_ref.encode("一<NL>二")
    s, e = data["spans"][data["pieces"].index("<NL>")]
    assert raw[s:e] == b"\n"


def test_bos_eos_and_parse_special(invoke, sp_ref):
    text = "終わり</s>"
    r = invoke("tokenize", "--format", "ids", "--bos", "--eos", text)
    assert r.stdout == ids_line(sp_ref.encode(text, add_bos=True, add_eos=True)) + "\n"
    plain = invoke("tokenize", "--format", "ids", text).stdout.split()
    assert str(sp_ref.eos_id()) not in plain
    parsed = invoke("tokenize", "--format", "ids", "--parse-special", text).stdout
    assert parsed == ids_line(sp_ref.encode("終わり") + [sp_ref.eos_id()]) + "\n"


def test_invalid_utf8_stops_with_the_line_number(run_toolbox, sp_ref):
    data = "よし\n".encode() + b"\xff\xfe\n" + "まだ\n".encode()
    p = run_toolbox("tokenize", "--format", "ids", input=data)
    assert p.returncode == 1
    assert "line 2" in one_line_error(p.stderr)
    assert out_lines(p.stdout) == [ids_line(sp_ref.encode("よし"))]  # the good line before it

    p = run_toolbox("tokenize", "--format", "ids", "--errors", "replace", input=data)
    assert p.returncode == 0, p.stderr
    assert out_lines(p.stdout) == [ids_line(sp_ref.encode(t)) for t in ("よし", "\ufffd\ufffd", "まだ")]


def test_invalid_utf8_in_whole_mode(run_toolbox):
    p = run_toolbox("tokenize", "--whole", input="一\n二\n".encode() + b"\xc3(")
    assert p.returncode == 1
    assert "line 3" in one_line_error(p.stderr)


# -- streaming -----------------------------------------------------------------------


class LineReader:
    """Reads a pipe's lines on a thread so the test can wait with a timeout."""

    def __init__(self, stream):
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in iter(stream.readline, b""):
            self.lines.put(line)
        self.lines.put(None)

    def next(self, timeout=20.0) -> bytes:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output line within {timeout} s: the command does not flush line by line")


@pytest.mark.parametrize("command", ["tokenize", "detokenize"])
def test_stdin_is_answered_line_by_line(command, sp_ref):
    """Each line's answer arrives while stdin is still open (as with `tail -f | toolbox ...`)."""
    inputs = ["吾輩は猫である。", "名前はまだ無い🍣"]
    if command == "detokenize":
        feed = [ids_line(sp_ref.encode(t)) for t in inputs]
        expected = inputs
    else:
        feed = inputs
        expected = [ids_line(sp_ref.encode(t)) for t in inputs]
    args = ["--format", "ids"] if command == "tokenize" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolbox", command, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_clean_env(), cwd=REPO,
    )
    try:
        reader = LineReader(proc.stdout)
        for line, want in zip(feed, expected):
            proc.stdin.write(line.encode("utf-8") + b"\n")
            proc.stdin.flush()
            assert reader.next() == want.encode("utf-8") + b"\n"
        proc.stdin.close()
        assert reader.next() is None
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()


# -- detokenize ----------------------------------------------------------------------


def test_detokenize_id_formats(invoke, sp_ref):
    text = "猫が🍣を食べた。"
    ids = sp_ref.encode(text)
    forms = [
        ids_line(ids),
        ",".join(map(str, ids)),
        ", ".join(map(str, ids)) + ",",
        "  " + "   ".join(map(str, ids)) + "  ",
        json.dumps(ids),
    ]
    for form in forms:
        r = invoke("detokenize", form)
        assert r.exit_code == 0, (form, r.output)
        assert r.stdout == text + "\n", form
    r = invoke("detokenize", input="\n".join(forms).encode() + b"\n")
    assert out_lines(r.stdout_bytes) == [text] * len(forms)


def test_detokenize_pieces(invoke, sp_ref):
    text = "  吾輩は\t猫🍣"
    pieces = sp_ref.encode(text, out_type=str)
    assert invoke("detokenize", " ".join(pieces)).stdout == text + "\n"
    assert invoke("detokenize", json.dumps(pieces, ensure_ascii=False)).stdout == text + "\n"
    assert invoke("detokenize", "--from", "pieces", " ".join(pieces)).stdout == text + "\n"


def test_detokenize_digit_pieces_need_from_pieces(invoke, sp_ref):
    """A line of digit pieces would read as ids in auto mode; --from pieces reads it as pieces."""
    digits = "".join(d for d in "0123456789" if sp_ref.piece_to_id(d) != sp_ref.unk_id())
    if not digits:
        pytest.skip("no ASCII digit is a piece of this vocabulary")
    pieces = " ".join(sp_ref.encode(digits, out_type=str))
    assert pieces.replace(" ", "").isdigit()
    assert invoke("detokenize", "--from", "pieces", pieces).stdout == digits + "\n"


def test_detokenize_empty_line_and_specials(invoke, sp_ref):
    ids = [sp_ref.bos_id()] + sp_ref.encode("猫") + [sp_ref.eos_id()]
    r = invoke("detokenize", input=f"\n{ids_line(ids)}\n".encode())
    assert out_lines(r.stdout_bytes) == ["", "猫"]


def _pipe(*commands, input: bytes) -> tuple[bytes, list[int]]:
    """Run `toolbox A | toolbox B | ...` through real OS pipes."""
    procs = []
    prev = subprocess.PIPE
    for args in commands:
        p = subprocess.Popen(
            [sys.executable, "-m", "toolbox", *args],
            stdin=prev, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_clean_env(), cwd=REPO,
        )
        if procs:
            procs[-1].stdout.close()  # the next process owns the read end now
        procs.append(p)
        prev = p.stdout
    first, last = procs[0], procs[-1]
    first.stdin.write(input)
    first.stdin.close()
    out = last.stdout.read()
    codes = [p.wait(timeout=60) for p in procs]
    for p in procs:
        p.stderr.close()
    last.stdout.close()
    return out, codes


def test_round_trip_through_a_pipe():
    out, codes = _pipe(["tokenize", "--format", "ids"], ["detokenize"], input=SAMPLE_BYTES)
    assert codes == [0, 0]
    assert out_lines(out) == SAMPLE_LINES


def test_pieces_round_trip(invoke):
    pieces = invoke("tokenize", input=SAMPLE_BYTES).stdout_bytes
    back = invoke("detokenize", "--from", "pieces", input=pieces)
    assert out_lines(back.stdout_bytes) == SAMPLE_LINES


@pytest.mark.parametrize("bad", ["99999999", "-1"])
def test_out_of_range_id_stops_at_its_line(run_toolbox, sp_ref, bad):
    good = ids_line(sp_ref.encode("一行目"))
    data = f"{good}\n{sp_ref.unk_id()} {bad}\n{good}\n".encode()
    p = run_toolbox("detokenize", input=data)
    assert p.returncode == 1
    message = one_line_error(p.stderr)
    assert "line 2" in message and bad in message
    assert out_lines(p.stdout) == ["一行目"]


def test_id_equal_to_vocabulary_size_is_out_of_range(invoke, sp_ref):
    r = invoke("detokenize", str(sp_ref.get_piece_size()))
    assert r.exit_code == 1
    assert str(sp_ref.get_piece_size()) in one_line_error(r.stderr)


def test_unknown_piece_stops_at_its_line(run_toolbox, sp_ref):
    good = " ".join(sp_ref.encode("一行目", out_type=str))
    p = run_toolbox("detokenize", "--from", "pieces", input=f"{good}\n{good} no-such-piece\n".encode())
    assert p.returncode == 1
    message = one_line_error(p.stderr)
    assert "line 2" in message and "no-such-piece" in message
    assert out_lines(p.stdout) == ["一行目"]


def test_detokenize_invalid_utf8(run_toolbox, sp_ref):
    p = run_toolbox("detokenize", input=ids_line(sp_ref.encode("猫")).encode() + b"\n\xff\n")
    assert p.returncode == 1
    assert "line 2" in one_line_error(p.stderr)
    assert out_lines(p.stdout) == ["猫"]


# -- inspect-bytes -------------------------------------------------------------------


def test_inspect_table_names_fallback_characters(invoke):
    r = invoke("inspect-bytes", "寿司🍣👋🏽")
    assert r.exit_code == 0
    for needle in ("byte fallback", "U+1F363", "SUSHI", "U+1F3FD", "EMOJI MODIFIER FITZPATRICK TYPE-4"):
        assert needle in r.stdout, needle
    assert "exact" in r.stdout  # round trip


def test_inspect_json_structure(invoke, sp_ref):
    for text in SAMPLE_LINES + [SAMPLE_TEXT]:
        r = invoke("inspect-bytes", "--json", text)
        data = json.loads(r.stdout)
        assert data["text"] == text
        segments = data["segments"]
        ids = [i for seg in segments for i in seg["ids"]]
        assert ids == sp_ref.encode(text)
        pos = 0
        for seg in segments:
            assert (seg["start"], seg["text"]) == (pos, text[seg["start"] : seg["end"]])
            pos = seg["end"]
            if seg["kind"] == "byte-fallback":
                # one character per segment, all of its byte pieces grouped under it
                assert len(seg["text"]) == 1
                assert all(p.startswith("<0x") for p in seg["pieces"])
                assert bytes(int(p[3:5], 16) for p in seg["pieces"]) == seg["text"].encode("utf-8")
                (char,) = seg["characters"]
                assert char["codepoint"] == f"U+{ord(seg['text']):04X}"
                assert char["name"] == unicodedata.name(seg["text"], char["name"])
        assert pos == len(text)
        s = data["summary"]
        assert s["characters"] == len(text)
        assert s["tokens"] == len(ids)
        assert s["vocabulary_characters"] + s["byte_fallback_characters"] + s["unknown_characters"] == len(text)
        assert s["byte_fallback_characters"] == len(fallback_chars(sp_ref, text))
        assert s["roundtrip"] is True
        assert s["normalized_segments"] == 0


def test_inspect_groups_zwj_sequences_per_code_point(invoke, sp_ref):
    family = "👨\u200d👩\u200d👧"
    data = json.loads(invoke("inspect-bytes", "--json", family).stdout)
    fallback = [seg["text"] for seg in data["segments"] if seg["kind"] == "byte-fallback"]
    assert "".join(fallback) == "".join(fallback_chars(sp_ref, family))
    assert "👨" in fallback and "👧" in fallback


def test_inspect_reports_normalization(invoke, nfkc_model_dir, nfkc_sp):
    text = "ｱＡ１"
    data = json.loads(invoke("inspect-bytes", "--json", "--model", str(nfkc_model_dir), text).stdout)
    assert [i for seg in data["segments"] for i in seg["ids"]] == nfkc_sp.encode(text)
    changed = {seg["text"]: seg["normalized"] for seg in data["segments"] if seg["normalized"] is not None}
    for ch in text:
        assert changed[ch] == unicodedata.normalize("NFKC", ch)
    assert data["summary"]["normalized_segments"] == len(text)
    assert data["summary"]["roundtrip"] is False

    table = invoke("inspect-bytes", "--model", str(nfkc_model_dir), "ｶﾞ").stdout
    assert "normalized" in table and "ガ" in table and "nmt_nfkc" in table and "differs" in table


def test_inspect_reads_stdin_and_file(invoke, sp_ref, sample_file):
    from_stdin = json.loads(invoke("inspect-bytes", "--json", input=SAMPLE_BYTES).stdout)
    from_file = json.loads(invoke("inspect-bytes", "--json", "--file", str(sample_file)).stdout)
    assert from_stdin == from_file
    assert from_file["text"] == SAMPLE_TEXT


def test_summary_on_a_file(invoke, sp_ref, sample_file):
    data = json.loads(invoke("inspect-bytes", "--summary", "--json", "--file", str(sample_file)).stdout)
    chars = sum(len(line) for line in SAMPLE_LINES)
    fallback = Counter(ch for line in SAMPLE_LINES for ch in fallback_chars(sp_ref, line))
    assert data["lines"] == len(SAMPLE_LINES)
    assert data["characters"] == chars
    assert data["tokens"] == sum(len(sp_ref.encode(line)) for line in SAMPLE_LINES)
    assert data["byte_fallback_characters"] == sum(fallback.values()) > 0
    assert data["fallback_rate"] == pytest.approx(sum(fallback.values()) / chars, abs=1e-6)
    assert data["roundtrip_failures"] == 0
    top = data["top_fallback"]
    assert {row["char"]: row["count"] for row in top} == dict(fallback.most_common(len(top)))
    assert [row["count"] for row in top] == sorted((row["count"] for row in top), reverse=True)

    table = invoke("inspect-bytes", "--summary", "--top", "3", "--file", str(sample_file)).stdout
    assert f"{len(SAMPLE_LINES)} lines" in table
    assert f"{sum(fallback.values()) / chars:.4%}" in table
    top_char, _ = fallback.most_common(1)[0]
    assert f"U+{ord(top_char):04X}" in table


def test_summary_counts_nfkc_round_trip_failures(invoke, nfkc_model_dir, nfkc_sp, sample_file):
    data = json.loads(
        invoke("inspect-bytes", "--summary", "--json", "--model", str(nfkc_model_dir), "--file", str(sample_file)).stdout
    )
    expected = sum(nfkc_sp.decode(nfkc_sp.encode(line)) != line for line in SAMPLE_LINES)
    assert data["roundtrip_failures"] == expected > 0


@pytest.mark.parametrize("layout", ["embedded", "series"])
def test_compare_hf(invoke, sp_ref, tmp_path, layout):
    transformers = pytest.importorskip("transformers")
    text = "  猫🍣"
    args = ["inspect-bytes", "--compare-hf", text]
    if layout == "series":  # spiece.model with the series' T5Tokenizer config, no tokenizer.json
        (tmp_path / "spiece.model").write_bytes(EMBEDDED_MODEL.read_bytes())
        (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer", "extra_ids": 0}')
        args += ["--model", str(tmp_path)]
    r = invoke(*args, "--json")
    assert r.exit_code == 0, r.output
    hf = json.loads(r.stdout)["compare_hf"]
    assert set(hf) >= {"class", "agree", "first_difference", "sentencepiece_ids", "transformers_ids"}
    assert hf["sentencepiece_ids"] == sp_ref.encode(text)
    assert hf["sentencepiece_pieces"] == sp_ref.encode(text, out_type=str)
    assert all(isinstance(i, int) for i in hf["transformers_ids"])
    assert hf["agree"] == (hf["transformers_ids"] == hf["sentencepiece_ids"])
    if not hf["agree"]:
        i = hf["first_difference"]
        assert hf["sentencepiece_ids"][:i] == hf["transformers_ids"][:i]
    if layout == "embedded":
        assert hf["agree"] is True  # its tokenizer.json (toolbox.hf_tokenizer) reproduces sentencepiece
    elif int(transformers.__version__.split(".")[0]) >= 5:
        assert hf["agree"] is False  # transformers 5 ignores use_fast=False on rinna-style models

    table = invoke(*args).stdout
    assert "transformers' tokenizer" in table


# -- models and model resolution ------------------------------------------------------


def test_models_list(invoke):
    entries = json.loads(invoke("models", "list", "--json").stdout)
    by_id = {e["id"]: e for e in entries}
    for model_id, alias in SERIES.items():
        assert alias in by_id[model_id]["aliases"]
    assert "embedded" in by_id and by_id["embedded"]["path"]
    table = invoke("models", "list").stdout
    for model_id, alias in SERIES.items():
        assert model_id in table and alias in table


@pytest.mark.parametrize("name", ["sft-v2", "rinna/japanese-gpt-neox-3.6b-instruction-sft-v2", "SFT-V2"])
def test_models_show(invoke, name):
    data = json.loads(invoke("models", "show", "--json", name).stdout)
    assert data["id"] == "rinna/japanese-gpt-neox-3.6b-instruction-sft-v2"
    assert data["prompt_format"] == "rinna-chat"
    assert data["defaults"]["repetition_penalty"] == 1.1
    assert "rinna/japanese-gpt-neox-3.6b-instruction-sft-v2" in invoke("models", "show", name).stdout


def test_models_show_unknown(run_toolbox):
    p = run_toolbox("models", "show", "no-such-model")
    assert p.returncode == 1
    assert "no-such-model" in one_line_error(p.stderr)


def test_model_directory_by_option_and_env(invoke, run_toolbox, nfkc_model_dir, nfkc_sp, sp_ref):
    text = "ｱｲｳ ＡＢＣ"
    assert nfkc_sp.encode(text) != sp_ref.encode(text)
    want = ids_line(nfkc_sp.encode(text)) + "\n"
    assert invoke("tokenize", "--format", "ids", "--model", str(nfkc_model_dir), text).stdout == want
    assert invoke("tokenize", "--format", "ids", text, env={"TOOLBOX_MODEL": str(nfkc_model_dir)}).stdout == want
    p = run_toolbox("tokenize", "--format", "ids", text, env={"TOOLBOX_MODEL": str(nfkc_model_dir)})
    assert p.stdout.decode() == want
    # --model wins over the environment
    r = invoke("tokenize", "--format", "ids", "-m", "embedded", text, env={"TOOLBOX_MODEL": str(nfkc_model_dir)})
    assert r.stdout == ids_line(sp_ref.encode(text)) + "\n"


def test_directory_without_tokenizer(run_toolbox, tmp_path):
    p = run_toolbox("tokenize", "--model", str(tmp_path), "x")
    assert p.returncode == 1
    assert "spiece.model" in one_line_error(p.stderr)


@pytest.mark.parametrize("name", ["3.6b", "someone/not-cached"])
def test_uncached_hub_model_offline(run_toolbox, tmp_path, name):
    p = run_toolbox("tokenize", "--model", name, "猫", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 1
    message = one_line_error(p.stderr)
    assert "toolbox download" in message and "HF_HUB_OFFLINE" in message
    assert p.stdout == b""


def test_cached_hub_model_works_offline(run_toolbox, tmp_path, nfkc_model_dir, nfkc_sp):
    """A snapshot laid out the way huggingface_hub caches it is found by alias, id and commit."""
    commit = "a" * 40
    fake_hub_cache(
        tmp_path,
        "rinna/japanese-gpt-neox-3.6b",
        {"spiece.model": nfkc_model_dir / "spiece.model", "config.json": nfkc_model_dir / "config.json"},
        commit=commit,
    )
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    text = "ｱｲｳ 猫"
    want = ids_line(nfkc_sp.encode(text))
    for args in (["--model", "3.6b"], ["--model", "rinna/japanese-gpt-neox-3.6b"], ["-m", "3.6b", "--revision", commit]):
        p = run_toolbox("tokenize", "--format", "ids", *args, text, env=env)
        assert p.returncode == 0, p.stderr
        assert out_lines(p.stdout) == [want]
    p = run_toolbox("tokenize", "-m", "3.6b", "--revision", "no-such-branch", text, env=env)
    assert p.returncode == 1
    assert "toolbox download" in one_line_error(p.stderr)


@pytest.mark.parametrize("name", ["embedded", "neko"])
def test_download_local_model(invoke, name):
    r = invoke("download", name)
    assert r.exit_code == 0
    assert "local" in r.stdout and "nothing to download" in r.stdout


def test_download_directory_is_local(invoke, nfkc_model_dir):
    assert "local" in invoke("download", str(nfkc_model_dir)).stdout


@pytest.mark.parametrize("command", [["tokenize", "-m", "no-such-model", "x"], ["download", "no-such-model"]])
def test_unknown_model_name(run_toolbox, command):
    p = run_toolbox(*command)
    assert p.returncode == 1
    message = one_line_error(p.stderr)
    assert "no-such-model" in message and "toolbox models list" in message
