"""`toolbox serve --ray`: the server's app as a Ray Serve deployment of two replicas, on a local
two-CPU Ray cluster, driven by the real `openai` client; a replica is killed and replaced while
the service keeps answering."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO, _clean_env
from serve_fixtures import API_KEY, SERVED_NAME, free_port, parse_sse

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

PROMPTS = ["吾輩は猫である。", "主人は", "迷亭君が", "細君は", "寒月君は", "猫が", "先生は", "下女が"]
REPLICA_PREFIX = "SERVE_REPLICA::toolbox#toolbox#"


class Service:
    """`toolbox serve --ray --replicas 2` as a child process, deploying onto the module's cluster."""

    def __init__(self, address: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="toolbox-ray-serve-")) / "serve.log"
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "toolbox", "serve", "--ray", "--ray-address", address, "--replicas", "2",
               "--threads", "1", "--port", str(self.port), "--api-key", API_KEY, "--served-model-name", SERVED_NAME]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while "ready" not in self.log():
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def service(cluster):
    svc = Service(cluster)
    try:
        svc.wait_ready()
        yield svc
    finally:
        if svc.proc.poll() is None:
            svc.proc.kill()
        svc.proc.wait()
        svc._log.close()


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def complete(client, prompt: str) -> tuple[str, str]:
    """(text, the replica that answered) of one greedy completion."""
    raw = client.completions.with_raw_response.create(model=SERVED_NAME, prompt=prompt, max_tokens=8, temperature=0)
    return raw.parse().choices[0].text, raw.headers["x-toolbox-replica"]


def replicas() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(REPLICA_PREFIX))


def test_two_replicas_answer_the_openai_client(service, client):
    import toolbox

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: complete(client, p), PROMPTS * 3))
    assert len({replica for _, replica in answers}) == 2  # requests were spread over both replicas
    by_prompt = {}
    for prompt, (text, _) in zip(PROMPTS * 3, answers):
        by_prompt.setdefault(prompt, set()).add(text)
    assert all(len(texts) == 1 for texts in by_prompt.values())  # every replica gives the same greedy text

    model = toolbox.load(threads=1)  # the library on the same prompts: what one server would answer
    params = model.params("openai", max_new_tokens=8, temperature=0)
    for prompt, texts in by_prompt.items():
        (expected,) = model.run([model.tokenize(prompt)], params)
        assert texts == {expected.text}

    chunks = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "猫"}],
                                            max_tokens=6, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # a stream through Ray
    assert [m.id for m in client.models.list()] == [SERVED_NAME]

    assert httpx.get(f"{service.url}/v1/models").status_code == 401  # the API key holds on every replica
    assert httpx.get(f"{service.url}/health").json() == {"status": "ok", "model": SERVED_NAME}
    raw = httpx.post(f"{service.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": SERVED_NAME, "prompt": "主人は", "max_tokens": 4, "stream": True})
    assert parse_sse(raw.text)[-1] == "[DONE]"
    metrics = httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'toolbox_requests_total{endpoint="/v1/completions"' in metrics


def test_killed_replica_is_replaced_while_the_service_answers(service, client):
    before = replicas()
    assert len(before) == 2
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    answered = [complete(client, p) for p in PROMPTS]  # no retries: each must succeed the first time
    assert all(text for text, _ in answered)
    assert {replica for _, replica in answered} == {before[1][len(REPLICA_PREFIX):]}  # the survivor

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replicas()
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the killed replica was not replaced: {replicas()}")
    deadline = time.monotonic() + 120  # the newcomer takes requests once its model is loaded
    while len({complete(client, p)[1] for p in PROMPTS}) < 2:
        assert time.monotonic() < deadline, "the new replica never answered"


def test_sigterm_takes_the_deployment_down(service):
    from ray import serve

    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=90) == 0, service.log()
    assert "toolbox" not in serve.status().applications
    assert replicas() == []
