"""The Ray options without a cluster: a missing Ray, an unreachable address and bad option values are
one-line errors, fast; the package imports neither Ray nor torch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, _clean_env

pytestmark = pytest.mark.slow

# Installed first on sys.path through PYTHONPATH: every import of ray fails as if it were not installed.
NO_RAY = """
import sys


class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoRay())
"""


def toolbox(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolbox", *args], capture_output=True, text=True,
                          env=env or _clean_env(), cwd=cwd or REPO, timeout=120)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def batch_files(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "吾輩は猫である。"}\n', encoding="utf-8")
    return src, tmp_path / "out"


@pytest.fixture
def no_ray_env(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_RAY)
    env = _clean_env()
    env["PYTHONPATH"] = f"{hook}:{env['PYTHONPATH']}"
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'ray'" in probe.stderr  # the simulation works
    return env


def test_generate_ray_without_ray_is_one_line_with_the_install_hint(no_ray_env, batch_files):
    src, out = batch_files
    p = toolbox("generate", "--ray", "--input", str(src), "--output", str(out), env=no_ray_env)
    assert p.returncode == 1
    assert p.stderr == "Error: toolbox generate --ray needs Ray: pip install 'rinna-toolbox[ray]'\n"
    assert not out.exists()  # failed before creating anything


def test_serve_ray_without_ray_is_one_line_with_the_install_hint(no_ray_env):
    p = toolbox("serve", "--ray", "--port", str(closed_port()), env=no_ray_env)
    assert p.returncode == 1
    assert p.stderr == "Error: toolbox serve --ray needs Ray: pip install 'rinna-toolbox[ray]'\n"


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_unreachable_cluster_is_a_one_line_error_within_seconds(command, batch_files):
    pytest.importorskip("ray")
    src, out = batch_files
    address = f"127.0.0.1:{closed_port()}"
    args = ["--input", str(src), "--output", str(out)] if command == "generate" else ["--port", str(closed_port())]
    started = time.monotonic()
    p = toolbox(command, "--ray", "--ray-address", address, *args)
    elapsed = time.monotonic() - started
    assert p.returncode == 1, p.stderr
    assert p.stderr == f"Error: --ray-address {address}: cannot reach a Ray cluster there (Connection refused)\n"
    assert elapsed < 30  # an interpreter start, the imports and one refused connection: no retry loop


def test_ray_options_need_ray(batch_files):
    src, out = batch_files
    p = toolbox("generate", "--replicas", "2", "--input", str(src), "--output", str(out))
    assert p.returncode == 2 and "--replicas, --gpus-per-actor and --ray-address go with --ray" in p.stderr
    p = toolbox("serve", "--autoscale", "1:2")
    assert p.returncode == 2 and "--replicas, --autoscale and --ray-address go with --ray" in p.stderr
    p = toolbox("serve", "--ray", "--replicas", "2", "--autoscale", "1:2")
    assert p.returncode == 2 and "give one" in p.stderr


def test_bad_autoscale_and_address_values():
    from toolbox.errors import ToolboxError
    from toolbox.ray.cluster import split_address
    from toolbox.ray.serve import parse_autoscale

    assert parse_autoscale("1:4") == (1, 4) and parse_autoscale("0:2") == (0, 2)
    for bad in ("4", "a:b", "3:2", "0:0", "-1:2"):
        with pytest.raises(ToolboxError, match=f"--autoscale {bad}: "):
            parse_autoscale(bad)
    assert split_address("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert split_address("ray://head") == ("head", 10001)
    assert split_address("ray://[::1]:10001") == ("::1", 10001)
    assert split_address("auto") is None
    for bad in ("head", "head:port", "http://head:80", "head:70000"):
        with pytest.raises(ToolboxError, match=f"--ray-address {bad}: "):
            split_address(bad)


def test_the_package_imports_neither_ray_nor_torch():
    code = ("import json, sys; import toolbox.ray.batch, toolbox.ray.serve, toolbox.ray.cluster; "
            "print(json.dumps([m for m in ('ray', 'torch', 'transformers') if m in sys.modules]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == []


def test_build_takes_the_servers_settings_and_refuses_bad_ones(monkeypatch):
    """`toolbox.ray.serve:build`, the application Ray's own tools (serve run, KubeRay) deploy."""
    pytest.importorskip("ray")
    from toolbox.errors import ToolboxError
    from toolbox.ray.serve import build

    monkeypatch.setenv("TOOLBOX_API_KEY", "from-the-environment")
    app = build({"model": "embedded", "replicas": "2", "threads": "1", "max_batch_size": "8"})
    deployment = app._bound_deployment  # what Ray will deploy: checked here without a cluster
    assert deployment.num_replicas == 2
    assert deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 0}
    choice, settings, cpus = deployment.init_args
    assert (choice.model, choice.threads, cpus) == ("embedded", 1, 1)
    assert (settings.max_batch_size, settings.api_key) == (8, "from-the-environment")
    scaled = build({"autoscale": "0:3", "backend": "cuda"})._bound_deployment
    assert (scaled._deployment_config.autoscaling_config.min_replicas,
            scaled._deployment_config.autoscaling_config.max_replicas) == (0, 3)
    assert scaled.ray_actor_options["num_gpus"] == 1  # a cuda replica holds a GPU
    with pytest.raises(ToolboxError, match="unknown argument 'replica'"):
        build({"replica": "2"})
    with pytest.raises(ToolboxError, match="replicas must be a whole number"):
        build({"replicas": "two"})
