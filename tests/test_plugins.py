"""Plugin loading, backend selection, and the example third-party plugin (plugins/example).

The example plugin is really pip-installed, but into a target directory that only
the subprocesses see (through PYTHONPATH), not into the venv: a plugin installed
there would show up in every other test running meanwhile (`toolbox backends`,
the generated CLI reference) and would stay behind if this run were killed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toolbox.registry import EMBEDDED_DIR

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "plugins" / "example"
BUILTIN = {"cpu", "cuda", "quant"}
HAS_CUDA_DRIVER = os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")
PROMPT = "吾輩は猫である。名前はまだ無い。"


def toolbox(*args: str, site: Path | None = None, timeout: float = 60, **env: str):
    """Run `python -m toolbox ARGS` in a fresh process (so the cached plugin manager starts anew).

    `env` adds variables (TOOLBOX_PLUGINS=...); `site` puts an extra install directory on PYTHONPATH.
    """
    clean = {k: v for k, v in os.environ.items() if k not in {"TOOLBOX_MODEL", "TOOLBOX_PLUGINS", "TOOLBOX_BACKEND"}}
    if site is not None:
        clean["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), clean.get("PYTHONPATH")) if p)
    clean.update(PYTHONIOENCODING="utf-8", COLUMNS="250", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "toolbox", *args], capture_output=True, env=clean,
                          cwd=HERE.parent, timeout=timeout)


def one_line_error(proc) -> str:
    """The stderr of a failed command, checked to be a single `Error: ...` line."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.decode("utf-8").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def listed_as_available(error: str) -> set[str]:
    """The backend names after "available: " in an error line."""
    return set(error.split("available: ", 1)[1].split(", "))


def backends_json(**kwargs) -> dict[str, dict]:
    proc = toolbox("backends", "--json", **kwargs)
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


# -- built-in backends and the TOOLBOX_PLUGINS allow-list ------------------------------


def test_backends_json_lists_builtins():
    rows = backends_json()
    assert BUILTIN <= set(rows)
    assert rows["cpu"]["available"] and rows["quant"]["available"]
    assert all(row["description"] and (row["reason"] is None) == row["available"] for row in rows.values())
    if not HAS_CUDA_DRIVER:
        assert rows["cuda"] == {**rows["cuda"], "available": False, "reason": "no CUDA device"}


def test_allow_list_leaves_the_builtins_alone():
    """TOOLBOX_PLUGINS filters third-party plugins only: the built-in backends are core and always on."""
    assert set(backends_json(TOOLBOX_PLUGINS="")) == BUILTIN
    assert set(backends_json(TOOLBOX_PLUGINS="cpu")) == BUILTIN
    proc = toolbox("generate", "--greedy", "--max-new-tokens", "4", "x", TOOLBOX_PLUGINS="")
    assert proc.returncode == 0, proc.stderr


def test_unknown_backend_is_a_one_line_error():
    error = one_line_error(toolbox("generate", "--backend", "nosuch", "x"))
    assert "unknown backend 'nosuch'" in error and {"cpu", "quant"} <= listed_as_available(error)


@pytest.mark.skipif(HAS_CUDA_DRIVER, reason="this machine has a CUDA driver")
def test_unavailable_backend_is_a_one_line_error():
    error = one_line_error(toolbox("generate", "--backend", "cuda", "x"))
    assert "'cuda' is not available (no CUDA device)" in error and listed_as_available(error) == {"cpu", "quant"}


# -- the example plugin ------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """plugins/example pip-installed into a private directory (see the module docstring)."""
    work = tmp_path_factory.mktemp("example_plugin")
    source, site = work / "src", work / "site"
    shutil.copytree(EXAMPLE, source)  # the build writes build/ and *.egg-info next to the sources
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(source)],
        check=True, capture_output=True, timeout=120,
    )
    assert (site / "toolbox_hf_example.py").is_file()
    return site


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random 2-layer GPT-NeoX in Hugging Face layout, sharing the embedded tokenizer."""
    from runtime_fixtures import build_hf, save

    from toolbox.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tiny_neox")
    shutil.copyfile(EMBEDDED_DIR / "spiece.model", path / "spiece.model")
    vocab = Tokenizer(path / "spiece.model").vocab_size  # 8000
    save(build_hf(vocab_size=vocab, bos_token_id=2, eos_token_id=3), path)
    return path


@pytest.fixture
def run_with_example(example_site):
    def _run(*args, **kwargs):
        return toolbox(*args, site=example_site, **kwargs)

    return _run


def test_example_backend_is_listed(run_with_example):
    proc = run_with_example("backends")
    assert proc.returncode == 0, proc.stderr
    assert any(line.split()[:2] == ["hf", "yes"] for line in proc.stdout.decode().splitlines())
    rows = json.loads(run_with_example("backends", "--json").stdout)
    assert [row["name"] for row in rows] == ["cpu", "cuda", "quant", "hf"]  # the built-ins first
    # The allow-list applies to third-party plugins: naming another plugin hides hf, not cpu.
    rows = json.loads(run_with_example("backends", "--json", TOOLBOX_PLUGINS="other").stdout)
    assert [row["name"] for row in rows] == ["cpu", "cuda", "quant"]
    rows = json.loads(run_with_example("backends", "--json", TOOLBOX_PLUGINS="hf").stdout)
    assert [row["name"] for row in rows] == ["cpu", "cuda", "quant", "hf"]


def test_example_plugin_loads_without_torch(example_site):
    """Registering the plugin and asking whether hf is available imports neither torch nor transformers."""
    code = ("import sys; from toolbox.backends import registered as backends; from toolbox.checkpoints import registry; "
            "assert backends()['hf'].unavailable_reason() is None and registry().get('hf-tiny'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(example_site), os.environ.get("PYTHONPATH")) if p)}
    env.pop("TOOLBOX_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == "[]"


def test_example_command(run_with_example):
    import transformers

    proc = run_with_example("hf-info")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == f"transformers {transformers.__version__}"
    assert b"hf-info" in run_with_example("--help").stdout


def test_example_model_entry(run_with_example):
    proc = run_with_example("models", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    entry = {spec["id"]: spec for spec in json.loads(proc.stdout)}["example/gpt-neox-tiny"]
    assert entry["prompt_format"] == "plain" and entry["aliases"] == ["hf-tiny"]


def test_example_backend_matches_cpu_greedy(run_with_example, checkpoint):
    def greedy(backend):
        proc = run_with_example("generate", "--backend", backend, "--greedy", "--max-new-tokens", "16",
                                "--json", "-m", str(checkpoint), PROMPT, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        (record,) = [json.loads(line) for line in proc.stdout.decode().splitlines()]
        return record

    hf, cpu = greedy("hf"), greedy("cpu")
    assert len(hf["token_ids"]) == 16 and hf["finish_reason"] == "length"
    assert hf["token_ids"] == cpu["token_ids"]
    assert hf["text"] == cpu["text"]
    assert hf["logprobs"] == pytest.approx(cpu["logprobs"], abs=1e-4)


# -- the example backend in-process: n samples, EOS, cancel, score -----------------------


@pytest.fixture(scope="module")
def example_module():
    """The plugin module imported by file path (not via an entry point, so nothing registers)."""
    spec = importlib.util.spec_from_file_location("toolbox_hf_example", EXAMPLE / "toolbox_hf_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_model(example_module, checkpoint):
    from toolbox.backend import LoadOptions

    return example_module.HFBackend().load(checkpoint, LoadOptions())


def test_unavailable_without_transformers(example_module, monkeypatch):
    assert example_module.HFBackend().unavailable_reason() is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert example_module.HFBackend().unavailable_reason() == "transformers is not installed"


def test_samples_seeds_and_cancel(hf_model):
    from toolbox.backend import GenerationParams

    prompts = [hf_model.tokenizer.encode(PROMPT), hf_model.tokenizer.encode("猫")]
    params = GenerationParams(max_new_tokens=5, temperature=1.0, top_k=50, seed=7, n=3)

    def run(cancel=None):
        stream, seqs = hf_model.generate_tokens(prompts, params), {}
        for step in stream:
            for event in step:
                seqs.setdefault(event.seq, []).append(event)
                if event.seq == cancel:
                    stream.cancel(cancel)
        return seqs

    seqs = run()
    assert sorted(seqs) == list(range(6))  # seq = prompt_index * n + sample
    assert all(len(s) == 5 and s[-1].finish_reason == "length" for s in seqs.values())
    assert all(e.finish_reason is None for s in seqs.values() for e in s[:-1])
    ids = {k: [e.token_id for e in s] for k, s in seqs.items()}
    assert len({tuple(v) for v in ids.values()}) > 1  # samples differ
    assert {k: [e.token_id for e in s] for k, s in run().items()} == ids  # the seed fixes them
    cancelled = run(cancel=4)
    assert len(cancelled[4]) == 1 and len(cancelled[3]) == 5


def test_eos_stops_a_sequence(hf_model, monkeypatch):
    from toolbox.backend import GenerationParams

    prompt = hf_model.tokenizer.encode(PROMPT)
    greedy = GenerationParams(max_new_tokens=4, temperature=0.0)
    first = [e for step in hf_model.generate_tokens([prompt], greedy) for e in step]
    monkeypatch.setattr(hf_model, "eos_ids", {first[1].token_id})  # pretend the 2nd token is EOS
    events = [e for step in hf_model.generate_tokens([prompt], greedy) for e in step]
    assert [e.token_id for e in events] == [e.token_id for e in first[:2]]
    assert events[-1].finish_reason == "stop"
    # min_new_tokens holds EOS off: a different token is chosen in its place.
    held = GenerationParams(max_new_tokens=4, min_new_tokens=4, temperature=0.0)
    events = [e for step in hf_model.generate_tokens([prompt], held) for e in step]
    assert len(events) == 4 and events[1].token_id != first[1].token_id


def test_score_matches_cpu_backend(hf_model, checkpoint):
    from toolbox.backend import LoadOptions
    from toolbox.backends import registered as backends

    seqs = [hf_model.tokenizer.encode(PROMPT), hf_model.tokenizer.encode("猫"), []]
    cpu = backends()["cpu"].load(checkpoint, LoadOptions())
    got, want = hf_model.score(seqs), cpu.score(seqs)
    assert [len(s.logprobs) for s in got] == [len(seqs[0]) - 1, 0, 0]
    assert got[0].logprobs == pytest.approx(want[0].logprobs, abs=1e-4) and got[1:] == want[1:]
    assert got[0].ranks == want[0].ranks


def test_text_layer_comes_for_free(hf_model):
    from toolbox.backend import GenerationParams

    prompt = hf_model.tokenizer.encode(PROMPT)
    events = list(hf_model.generate([prompt], GenerationParams(max_new_tokens=12, temperature=0.0)))
    text = "".join(e.text for e in events)
    assert len(events) == 12 and text
    stop = text[3:5]
    stopped = list(hf_model.generate([prompt], GenerationParams(max_new_tokens=12, temperature=0.0, stop=(stop,))))
    assert "".join(e.text for e in stopped) == text[: text.index(stop)]
    assert stopped[-1].finish_reason == "stop"
