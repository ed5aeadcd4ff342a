"""Shared fixtures for the tokenizer and CLI tests.

Everything here is generated in place: the Japanese sample text is written below
(our own sentences), and the second tokenizer (`nfkc_model_dir`) is trained by
sentencepiece at the start of the session. Nothing is read from outside the
repository and nothing touches the network.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from click.testing import CliRunner

import toolbox
from toolbox.registry import EMBEDDED_DIR
from toolbox.tokenizer import Tokenizer

# Long runs of generation (serve, batch files) compile the CPU decode step by default, 5-10 s
# a process: the suite runs them eagerly. tests/test_cpu_compiled.py checks the compiled step,
# and one test there the default (with the variable removed).
os.environ.setdefault("TOOLBOX_CPU_COMPILE", "0")

# Where the toolbox under test lives; subprocesses run it from there, so they test the same code.
REPO = Path(os.path.abspath(toolbox.__file__)).parent.parent
EMBEDDED_MODEL = EMBEDDED_DIR / "spiece.model"

# Each entry: (line text, line end). Lines cover the scripts and the awkward cases
# a Japanese tokenizer meets; the line ends mix CRLF, LF and a missing final newline.
SAMPLE = [
    ("わたしは毎朝、川沿いの道を歩いて駅まで行きます。", "\r\n"),
    ("コーヒーとチョコレートケーキを注文して、ノートパソコンを開いた。", "\r\n"),
    ("ﾊﾝｶｸｶﾀｶﾅも混ざります：ｱｲｳｴｵ、ｶﾞｷﾞｸﾞｹﾞｺﾞ、ﾊﾟﾋﾟﾌﾟ。", "\r\n"),
    ("", "\r\n"),
    ("夕食は🍣と🍜でした😋 家族👨‍👩‍👧‍👦で手を振る👋🏽 旗は🇯🇵、虹は🏳️‍🌈。", "\n"),
    ("𠮷野さんは憂鬱の「鬱」と、雲が三つの「龘」を書いてみせた。", "\n"),
    ("列A\t列B\t\t列C\t", "\n"),
    ("  先頭に空白が二つ、   途中に三つ、末尾にも   ", "\n"),
    ("　全角スペースで字下げした段落です。　途中にも　あります。", "\n"),
    ("", "\n"),
    ("文末は</s>で、文頭は<s>、改行は<NL>と書きます。<unk>もただの文字列。", "\r\n"),
    ("Version 3.6b は 2023年3月17日 に公開、価格は¥1,980（税込）です。ＡＢＣ１２３ ｘｙｚ", "\n"),
    ("The quick brown fox jumps over the lazy dog. 0123456789", "\n"),
    ("", "\n"),
    ("最後の行には改行がありません", ""),
]

SAMPLE_LINES = [line for line, _ in SAMPLE]
SAMPLE_TEXT = "".join(line + end for line, end in SAMPLE)
SAMPLE_BYTES = SAMPLE_TEXT.encode("utf-8")

# Text the nfkc model is trained on: it never sees emoji or the rare kanji, so
# those fall back to bytes there too.
TRAINING_SENTENCES = [
    "吾輩は毎日、町の本屋で新しい本を探している。",
    "カタカナのコーヒーとケーキ、ひらがなのおちゃとおかし。",
    "今日は天気が良いので、公園まで散歩に行きましょう。",
    "先生は黒板に漢字を書き、生徒はそれをノートに写した。",
    "電車が駅に着くと、人々は一斉に降りていった。",
    "Tokyo Osaka Kyoto 123 456 789 ABC abc",
    "アイウエオ、カキクケコ、ガギグゲゴ、パピプペポ。",
    "文末は</s>で改行は<NL>と書く。",
]


def _clean_env(**extra: str) -> dict[str, str]:
    """The current environment without variables that would change which model or cache is used."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"TOOLBOX_MODEL", "TOOLBOX_PLUGINS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
                     "PYTHONUNBUFFERED"}
    }
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(PYTHONPATH=path, PYTHONIOENCODING="utf-8", COLUMNS="250", **extra)
    return env


@pytest.fixture(autouse=True)
def _no_model_env(monkeypatch):
    """A TOOLBOX_MODEL set in the developer's shell must not leak into the tests."""
    monkeypatch.delenv("TOOLBOX_MODEL", raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: no wrapping of long Unicode names


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    return EMBEDDED_MODEL


@pytest.fixture(scope="session")
def embedded_tok() -> Tokenizer:
    return Tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def sp_ref() -> spm.SentencePieceProcessor:
    """The independent reference: sentencepiece itself on the embedded model file."""
    return spm.SentencePieceProcessor(model_file=str(EMBEDDED_MODEL))


@pytest.fixture(scope="session")
def sample_lines() -> list[str]:
    return list(SAMPLE_LINES)


@pytest.fixture(scope="session")
def sample_text() -> str:
    return SAMPLE_TEXT


@pytest.fixture
def sample_file(tmp_path) -> Path:
    path = tmp_path / "sample.txt"
    path.write_bytes(SAMPLE_BYTES)
    return path


@pytest.fixture(scope="session")
def nfkc_model_dir(tmp_path_factory) -> Path:
    """A checkpoint-style directory whose spiece.model uses nmt_nfkc normalization.

    Trained here (about a second): same conventions as the series otherwise
    (byte fallback, no dummy prefix, whitespace kept, <NL> piece, pad/unk/bos/eos 0..3).
    """
    out = tmp_path_factory.mktemp("nfkc_model")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_SENTENCES * 20),
        model_writer=model,
        model_type="unigram",
        vocab_size=420,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["<NL>"],
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="[PAD]",
        num_threads=1,
        minloglevel=2,
    )
    (out / "spiece.model").write_bytes(model.getvalue())
    config = json.loads((EMBEDDED_DIR / "config.json").read_text(encoding="utf-8"))
    config["vocab_size"] = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def nfkc_sp(nfkc_model_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(nfkc_model_dir / "spiece.model"))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner):
    """Run the CLI in-process: invoke("tokenize", "--format", "ids", input=b"...")."""
    from toolbox.cli import cli

    def _invoke(*args, input=None, env=None):
        return runner.invoke(cli, list(args), input=input, env=env, catch_exceptions=False)

    return _invoke


@pytest.fixture
def run_toolbox():
    """Run `python -m toolbox ARGS` as a real process; returns CompletedProcess with bytes output."""

    def _run(*args, input: bytes | None = None, env: dict | None = None, timeout: float = 60):
        return subprocess.run(
            [sys.executable, "-m", "toolbox", *args],
            input=input,
            capture_output=True,
            env=_clean_env(**(env or {})),
            cwd=REPO,
            timeout=timeout,
        )

    return _run


def fake_hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path],
                   commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Lay out huggingface_hub's cache by hand, as a finished download would leave it.

    <HF_HOME>/hub/models--<owner>--<name>/{refs/main, snapshots/<commit>/<files>}; real
    downloads keep blobs and symlink to them, but the lookup only needs these paths.
    """
    assert len(commit) == 40
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """A toolbox cache (``$TOOLBOX_CACHE``) of the test module's own, for libraries it builds once."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TOOLBOX_CACHE")
    os.environ["TOOLBOX_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TOOLBOX_CACHE")
    else:
        os.environ["TOOLBOX_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small random GPT-NeoX in the Hugging Face layout with the embedded tokenizer
    (config.json + model.safetensors + spiece.model), context TINY_CONTEXT tokens."""
    from runtime_fixtures import TINY_CONTEXT, build_hf, save

    path = tmp_path_factory.mktemp("tiny")
    save(build_hf(vocab_size=8000, max_position_embeddings=TINY_CONTEXT, init=0.05), path)
    shutil.copy(EMBEDDED_DIR / "spiece.model", path / "spiece.model")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny forwards: one torch thread is fastest, and immune to a busy
    machine's thread contention. Restores the thread count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def neox3(tmp_path_factory):
    """A random fp32 GPT-NeoX of 3 layers (runtime_fixtures' shape): greedy output stays
    varied for 128 tokens (see test_runtime_generation)."""
    from runtime_fixtures import build_hf, save

    from toolbox.runtime.model import GPTNeoX

    return GPTNeoX.from_pretrained(save(build_hf(num_hidden_layers=3), tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module, two CPUs, as light as Ray allows; its GCS address."""
    ray = pytest.importorskip("ray")
    auth = os.environ.get("RAY_AUTH_MODE")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if auth is None:
        os.environ.pop("RAY_AUTH_MODE", None)  # ray.init turned token authentication on for its children
