"""Real `toolbox serve` processes on free loopback ports, for tests/test_serve.py.

Import with ``from serve_fixtures import ...``. Each `ServerProcess` is
`python -m toolbox serve --port <free>` with its output in a log file, shown when a
test needs it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from conftest import REPO, _clean_env

from toolbox.registry import EMBEDDED_DIR

API_KEY = "test-key-0123456789"
SERVED_NAME = "toy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_weights() -> bool:
    return (EMBEDDED_DIR / "model.safetensors").is_file()


class ServerProcess:
    """`toolbox serve` as a child process; `url` once `wait_ready` returns."""

    def __init__(self, model: str, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.mkdtemp(prefix="toolbox-serve-")
        self.log_path = Path(self._dir) / "server.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "toolbox", "serve", "--port", str(self.port), "-m", model,
               "--served-model-name", SERVED_NAME, "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(**(env or {})), stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        """Poll /health until 200 (it is 503 while the model loads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log()}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def parse_sse(raw: str) -> list:
    """The `data:` payloads of an SSE body: JSON objects, then the literal "[DONE]"."""
    import json

    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert all(line.startswith("data: ") for line in lines), f"malformed SSE event: {block!r}"
        data = "\n".join(line[len("data: "):] for line in lines)
        events.append(data if data == "[DONE]" else json.loads(data))
    return events

