"""`toolbox serve` end to end: real server processes on loopback, real HTTP clients.

Two servers start once for the module (in parallel): `main` (API key, batch 32) and
`small` (batch 1, queue 1: the queue limit, and SIGTERM at the end). Clients are
httpx and the official `openai` package. The model is the embedded one (or the tiny
random checkpoint when the embedded weights are not built).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_fixtures import API_KEY, SERVED_NAME, ServerProcess, embedded_weights, free_port, parse_sse

from toolbox.registry import EMBEDDED_DIR

# The Azure ML catalog's sample request, byte for byte as in the reference document.
AZURE_SAMPLE = (
    b'{"input_data": {"input_string": ["What is your favourite condiment?", "Do you have mayonnaise recipes?"],\n'
    b'                "parameters": {"max_new_tokens": 100, "do_sample": true, "return_full_text": false}}}'
)
PROMPT = "吾輩は猫である。名前はまだ無い。"


@pytest.fixture
def keep_torch_threads():
    """Tests that load the model in this process ask for 1 thread; give the others theirs back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(request):
    """(value for --model, checkpoint directory)."""
    if embedded_weights():
        return "embedded", EMBEDDED_DIR
    path = request.getfixturevalue("tiny_checkpoint")
    return str(path), path


@pytest.fixture(scope="module")
def servers(model):
    main = ServerProcess(model[0], "--api-key", API_KEY, "--max-batch-size", "32", "--max-queue", "64")
    small = ServerProcess(model[0], "--max-batch-size", "1", "--max-queue", "1", "--shutdown-timeout", "30")
    procs = {"main": main, "small": small}
    try:
        main.wait_ready()
        small.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture
def small(servers, model):
    """The batch-1/queue-1 server, restarted if an earlier test stopped it."""
    if not servers["small"].alive:
        servers["small"].stop()
        servers["small"] = ServerProcess(model[0], "--max-batch-size", "1", "--max-queue", "1").wait_ready()
    return servers["small"]


@pytest.fixture(scope="module")
def api(servers):
    with httpx.Client(base_url=servers["main"].url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def ctx(api):
    return api.get("/v1/models").json()["data"][0]["max_model_len"]


@pytest.fixture(scope="module")
def oai(servers):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=servers["main"].url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def greedy(api, prompt=PROMPT, **extra):
    r = api.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


# -- health, models, auth ----------------------------------------------------------


def test_health_models_and_auth(servers, api, ctx):
    url = servers["main"].url
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": SERVED_NAME}  # no key needed
    models = api.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [SERVED_NAME]
    assert ctx > 16
    assert api.get(f"/v1/models/{SERVED_NAME}").json()["id"] == SERVED_NAME
    assert api.get("/v1/models/nope").status_code == 404
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.get(url + path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "猫"})
    assert r.status_code == 401
    # the small server has no key
    assert httpx.get(f"{servers['small'].url}/v1/models").status_code == 200


def test_health_is_503_until_the_model_is_loaded(model, keep_torch_threads):
    """In-process uvicorn on a real socket: /health and the API answer 503 until attach()."""
    import uvicorn

    from toolbox.api import load
    from toolbox.serving.app import Settings, create_app

    app = create_app(None, Settings(served_model_name="late"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        r = httpx.get(f"{base}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "猫"})
        assert r.status_code == 503 and "Retry-After" in r.headers and r.json()["error"]["code"] == "model_loading"
        app.state.server.attach(load(model[0], "cpu", threads=1))
        assert httpx.get(f"{base}/health").status_code == 200
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "猫", "max_tokens": 2, "model": "late"})
        assert r.status_code == 200, r.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# -- Azure ML ------------------------------------------------------------------------


def test_azure_sample_request_byte_for_byte(api):
    r = api.post("/score", content=AZURE_SAMPLE, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and len(body) == 2
    for item in body:
        assert list(item) == ["0"] and isinstance(item["0"], str) and item["0"]


def test_azure_newer_form_and_return_full_text(api):
    strings = ["吾輩は猫である。", "主人は"]
    params = {"max_new_tokens": 8, "do_sample": False}
    old = api.post("/score", json={"input_data": {"input_string": strings, "parameters": params}}).json()
    new = api.post("/score", json={"input_data": strings, "params": params}).json()
    assert old == new  # greedy: both forms give the same answer
    assert [o["0"][: len(s)] for o, s in zip(old, strings)] == strings  # return_full_text defaults to true
    cut = api.post("/score", json={"input_data": strings, "params": {**params, "return_full_text": False}}).json()
    assert [s + c["0"] for s, c in zip(strings, cut)] == [o["0"] for o in old]


# -- OpenAI completions and chat, through the official client ----------------------------


def test_openai_client_completions(oai):
    c = oai.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert c.object == "text_completion" and c.model == SERVED_NAME
    assert c.choices[0].finish_reason in ("stop", "length") and isinstance(c.choices[0].text, str)
    assert 1 <= c.usage.completion_tokens <= 8 and c.usage.prompt_tokens > 0
    many = oai.completions.create(model=SERVED_NAME, prompt=["猫", "主人は"], max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    again = oai.completions.create(model=SERVED_NAME, prompt=["猫", "主人は"], max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [ch.text for ch in many.choices] == [ch.text for ch in again.choices]  # seeded: reproducible


def test_stop_strings_cut_the_text(api):
    full = greedy(api, min_tokens=24)["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = greedy(api, min_tokens=24, stop=["@@never@@", stop])["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    events = parse_sse(api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "min_tokens": 24,
                                                         "temperature": 0, "stream": True, "stop": stop}).text)
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == cut["text"]


def test_openai_client_streaming_equals_blocking(oai):
    full = oai.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(oai.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_client_chat(oai):
    messages = [{"role": "system", "content": "短く答えてください。"}, {"role": "user", "content": "猫の名前は？"}]
    r = oai.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=12, temperature=0)
    answer = r.choices[0].message
    assert r.object == "chat.completion" and answer.role == "assistant" and isinstance(answer.content, str)
    stream = oai.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == answer.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_uses_the_series_template(api):
    """system text goes in front of the first user message; the answer's <NL> become newlines."""
    from toolbox.prompts import chat_prompt

    tok = api.post("/tokenize", json={"text": chat_prompt([("user", "前置き\n猫は？")])}).json()
    r = api.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "前置き"}, {"role": "user", "content": "猫は？"}],
        "max_tokens": 4, "temperature": 0}).json()
    assert r["usage"]["prompt_tokens"] == tok["count"]
    assert "<NL>" not in r["choices"][0]["message"]["content"]


# -- exactness: greedy ids and prompt log-probabilities ----------------------------------


def test_greedy_ids_equal_the_cli(api, model, keep_torch_threads):
    from click.testing import CliRunner

    from toolbox.cli import cli

    result = CliRunner().invoke(cli, ["generate", "-m", model[0], "--greedy", "--json", "--max-new-tokens", "24",
                                      "--threads", "1", PROMPT])
    assert result.exit_code == 0, result.output
    cli_ids = json.loads(result.stdout.splitlines()[0])["token_ids"]
    served = greedy(api, return_token_ids=True)["choices"][0]
    assert served["token_ids"] == cli_ids
    streamed = parse_sse(api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                           "stream": True, "return_token_ids": True}).text)
    assert streamed[-1] == "[DONE]"
    assert [t for e in streamed[:-1] for c in e["choices"] for t in c["token_ids"]] == cli_ids


def test_echo_logprobs_equal_transformers(api, model):
    import torch
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(model[1], dtype=torch.float32).eval()
    text = "吾輩は猫である。名前はまだ無い。寿司🍣"
    r = api.post("/v1/completions", json={"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    ids = api.post("/tokenize", json={"text": text}).json()["ids"]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], ref)) < 1e-4
    # top_logprobs (logprobs=1): the most likely token at each position, as transformers ranks them
    tops = lp["top_logprobs"]
    assert tops[0] is None and all(len(t) == 1 for t in tops[1:])
    best = torch.log_softmax(logits, -1).max(-1)
    tok_text = [api.post("/detokenize", json={"ids": [int(i)]}).json()["text"] for i in best.indices[:-1].tolist()]
    for top, want_text, want_lp in zip(tops[1:], tok_text, best.values.tolist()):
        (got_text, got_lp), = top.items()
        assert abs(got_lp - want_lp) < 1e-4
        assert got_text == want_text or got_text.startswith("bytes:")
    # lm-evaluation-harness' greedy test: a token is greedy when its logprob is the top one
    assert [abs(a - max(t.values())) < 1e-6 for a, t in zip(lp["token_logprobs"][1:], tops[1:])] == [
        r == b for r, b in zip(ids[1:], best.indices[:-1].tolist())]
    # offsets point into the text; byte-fallback pieces of one character share its offset
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert any(t.startswith("bytes:") for t in lp["tokens"])
    # token-id prompts give the same numbers; with generation the completion's tokens follow
    r2 = api.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 3,
                                          "temperature": 0}).json()["choices"][0]
    assert r2["logprobs"]["token_logprobs"][: len(ids)] == lp["token_logprobs"]
    assert r2["logprobs"]["top_logprobs"] is None  # logprobs 0: no alternatives
    assert len(r2["logprobs"]["tokens"]) == len(ids) + 3 or r2["finish_reason"] == "stop"
    assert r2["text"].startswith(text)


def test_engine_with_the_generic_static_batcher(model, keep_torch_threads):
    """The engine drives any backend's batcher: the generic StaticBatcher gives the same greedy tokens."""
    from dataclasses import replace

    from toolbox.api import load
    from toolbox.backend import GenerationParams
    from toolbox.batching import StaticBatcher
    from toolbox.serving.engine import Engine, SequenceSpec

    loaded = load(model[0], "cpu", threads=1)

    class Static:  # the loaded model, with the fallback batcher any backend gets
        tokenizer = loaded.tokenizer

        def batcher(self, capacity):
            return StaticBatcher(loaded.loaded, capacity)

    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    prompts = [loaded.tokenizer.encode(p) for p in ("猫", "主人は", PROMPT)]

    async def run(engine):
        leaving = engine.submit([SequenceSpec(prompts[0], replace(params, max_new_tokens=40))])
        subs = [engine.submit([SequenceSpec(p, params)]) for p in prompts]
        first = await leaving.queue.get()
        leaving.cancel()
        out = []
        for sub in subs:
            out.append([o.token_id async for o in sub.outputs()])
        return first, out

    results = {}
    for name, m in (("static", Static()), ("continuous", loaded.loaded)):
        engine = Engine(m, 4, 4)
        engine.start()
        first, results[name] = asyncio.run(run(engine))
        assert first.finish_reason is None
        assert engine.drain(10) and engine.admitted == 0
    assert results["static"] == results["continuous"]
    assert all(len(ids) == 12 or ids[-1] == 3 for ids in results["static"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU priorities are Linux's")
def test_engine_thread_runs_below_the_http_thread(model, keep_torch_threads):
    """--engine-nice: the model's thread yields the CPU to request handling under load."""
    from toolbox.api import load
    from toolbox.serving.engine import Engine

    loaded = load(model[0], "cpu", threads=1)
    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for nice, want in ((3, min(here + 3, 19)), (0, here)):
        engine = Engine(loaded.loaded, 2, 2, nice=nice)
        engine.start()

        async def engine_priority(engine=engine):
            return await engine.call(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

        assert asyncio.run(engine_priority()) == want
        assert engine.drain(10)


def model_process(server: ServerProcess) -> int:
    """The pid of the server's model process (its one child)."""
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == server.proc.pid]
    assert len(children) == 1, children
    return children[0]


def _ppid(proc_dir: Path) -> int | None:
    try:  # the command name may hold spaces: the fields after ")" are unambiguous
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _nice(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_model_runs_in_a_process_of_its_own(servers):
    """The default: torch and the model live in a child process, niced below the HTTP side."""
    server = servers["main"]
    pid = model_process(server)
    assert "toolbox.serving.worker" in Path(f"/proc/{pid}/cmdline").read_text()
    assert _nice(pid) == min(_nice(server.proc.pid) + 5, 19)  # --engine-nice 5
    assert "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in Path(f"/proc/{server.proc.pid}/maps").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_dead_model_process_fails_requests_not_the_server(model):
    server = ServerProcess(model[0]).wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions",
                               json={"prompt": PROMPT, "max_tokens": 200, "min_tokens": 200, "stream": True}) as r:
                chunks = r.iter_bytes()
                received = next(chunks)
                os.kill(model_process(server), signal.SIGKILL)
                for part in chunks:  # the stream ends, with an error event, instead of hanging
                    received += part
            error = [e for e in parse_sse(received.decode()) if e != "[DONE]" and "error" in e]
            assert error and "model process exited (killed by signal 9)" in error[0]["error"]["message"]
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            r = client.post("/v1/completions", json={"prompt": "猫", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed", r.text
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.log()
    finally:
        server.stop()


# -- malformed requests --------------------------------------------------------------------

BAD = [
    ("/v1/completions", b'{"prompt": "a", ', 400, "body"),
    ("/v1/completions", b"[1, 2]", 400, "body"),
    ("/v1/completions", b"", 400, "body"),
    ("/v1/completions", '{"prompt": "\xff"}'.encode("latin-1"), 400, "body"),  # invalid UTF-8
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "prompt"),  # lone surrogate escape
    ("/v1/completions", b'{"prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": "5"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": -1}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 100000}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "a", "n": 0}', 400, "n"),
    ("/v1/completions", b'{"prompt": "a", "n": 1000}', 400, "n"),
    ("/v1/completions", b'{"prompt": "a", "temperature": "hot"}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "a", "stream": 1}', 400, "stream"),
    ("/v1/completions", b'{"prompt": "a", "stop": [1]}', 400, "stop"),
    ("/v1/completions", b'{"prompt": "a", "model": "gpt-4"}', 404, "model"),
    ("/v1/completions", b'{"prompt": [[5], [99999999]]}', 400, "prompt[1]"),
    ("/v1/completions", b'{"prompt": ["a", ""]}', 400, "prompt[1]"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "tool", "content": "x"}]}', 400, "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', 400, "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 400, "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "model": "nope"}', 404, "model"),
    ("/score", b'{"input_data": 3}', 400, "input_data"),
    ("/score", b'{"input_data": {"input_string": ["a"], "parameters": {"num_beams": 4}}}', 400,
     "input_data.parameters.num_beams"),
    ("/score", b'{"input_data": ["a"], "params": {"max_new_tokens": 0}}', 400, "params.max_new_tokens"),
    ("/score", b'{"input_data": {"input_string": "a"}}', 400, "input_data.input_string"),
    ("/tokenize", b'{"text": 1}', 400, "text"),
    ("/detokenize", b'{"ids": [1, -1]}', 400, "ids[1]"),
    ("/detokenize", b'{"pieces": ["no such piece"]}', 400, "pieces[0]"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{b[0]}:{b[3]}:{i}" for i, b in enumerate(BAD)])
def test_malformed_requests_get_4xx_naming_the_field(api, path, body, status, param):
    r = api.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


def test_prompt_over_the_context(api, ctx):
    r = api.post("/v1/completions", json={"prompt": [5] * (ctx + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = api.post("/v1/completions", json={"prompt": [5] * (ctx - 2), "max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = api.post("/v1/completions", json={"prompt": [5] * (ctx - 2)})  # the default is lowered to fit
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    long_chat = {"messages": [{"role": "user", "content": "猫" * (ctx + 5)}]}
    r = api.post("/v1/chat/completions", json=long_chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(api.base_url.join("/health")).status_code == 200


# -- tokenizer, metrics, OpenAPI -----------------------------------------------------------


def test_tokenize_detokenize(api):
    t = api.post("/tokenize", json={"text": "吾輩は猫🍣"}).json()
    assert t["count"] == len(t["ids"]) == len(t["pieces"]) == len(t["offsets"])
    assert any(p.startswith("<0x") for p in t["pieces"])
    assert api.post("/detokenize", json={"ids": t["ids"]}).json()["text"] == "吾輩は猫🍣"
    d = api.post("/detokenize", json={"pieces": t["pieces"]}).json()
    assert d["text"] == "吾輩は猫🍣" and d["ids"] == t["ids"]
    assert api.post("/detokenize", json={"ids": [1], "pieces": ["a"]}).status_code == 400


def test_metrics(api):
    greedy(api)
    text = api.get("/metrics").text
    for name in ("toolbox_requests_total", "toolbox_prompt_tokens_total", "toolbox_generation_tokens_total",
                 "toolbox_request_duration_seconds_bucket", "toolbox_time_to_first_token_seconds_bucket",
                 "toolbox_queue_depth", "toolbox_running_sequences", "toolbox_batch_size_bucket"):
        assert name in text, name
    assert 'toolbox_requests_total{endpoint="/v1/completions",method="POST",status="200"}' in text


def test_openapi_document(api):
    doc = api.get("/openapi.json").json()
    for path in ("/score", "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                 "/health", "/metrics"):
        assert path in doc["paths"], path
    op = doc["paths"]["/v1/completions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    assert {"200", "400", "401", "429"} <= set(op["responses"]) and "422" not in op["responses"]
    schemas = doc["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "AzureRequest", "ErrorResponse"} <= set(schemas)
    assert "max_tokens" in schemas["CompletionRequest"]["properties"]
    assert doc["security"] == [{"bearer": []}] and doc["paths"]["/health"]["get"]["security"] == []


# -- concurrency, limits, disconnects, shutdown --------------------------------------------


def test_32_concurrent_streams_some_disconnecting(servers, api):
    url = servers["main"].url
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def one(http, k):
        body = {"prompt": ["猫", "主人は", "吾輩は"][k % 3], "max_tokens": 16, "temperature": 0.8, "stream": True,
                "n": 1 if k % 4 else 2}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            if k % 5 == 4:  # leaves after the first chunk
                async for _ in r.aiter_bytes():
                    return None
            return parse_sse((await r.aread()).decode("utf-8"))

    async def run():
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(one(http, k) for k in range(32)))

    results = asyncio.run(run())
    finished = [r for r in results if r is not None]
    assert len(finished) == 32 - len([k for k in range(32) if k % 5 == 4])
    for k, events in zip([k for k in range(32) if k % 5 != 4], finished):
        assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
        assert all(e["object"] == "text_completion" and "error" not in e for e in events[:-1])
        n = 1 if k % 4 else 2
        ends = [c for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
        assert sorted(c["index"] for c in ends) == list(range(n))
    # the server is healthy and the abandoned sequences were released
    assert httpx.get(f"{url}/health").status_code == 200
    for _ in range(100):
        metrics = api.get("/metrics").text
        if "toolbox_queue_depth 0.0" in metrics and "toolbox_running_sequences 0.0" in metrics:
            break
        time.sleep(0.05)
    assert "toolbox_queue_depth 0.0" in metrics and "toolbox_running_sequences 0.0" in metrics
    assert greedy(api)["choices"][0]["finish_reason"] in ("stop", "length")


def long_stream(url: str, client: httpx.Client, tokens: int):
    body = {"prompt": "猫", "max_tokens": tokens, "min_tokens": tokens, "stream": True, "temperature": 1.0}
    return client.stream("POST", f"{url}/v1/completions", json=body)


def test_queue_limit_429_and_disconnect_frees_the_slot(small, ctx):
    url = small.url
    tokens = ctx - 8
    with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b, httpx.Client(timeout=60) as c:
        with long_stream(url, a, tokens) as first:  # running (batch of 1)
            assert first.status_code == 200
            first_chunks = first.iter_bytes()  # (dropping the iterator would close the connection)
            next(first_chunks)
            with long_stream(url, b, tokens) as second:  # admitted, waiting (queue of 1)
                assert second.status_code == 200
                r = c.post(f"{url}/v1/completions", json={"prompt": "猫", "max_tokens": 1})
                assert r.status_code == 429, r.text
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
                first.close()  # the client leaves: its place is free at once
                deadline = time.monotonic() + 10
                while True:
                    with c.stream("POST", f"{url}/v1/completions", json={"prompt": "猫", "stream": True}) as r:
                        status = r.status_code
                    if status == 200 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                assert status == 200
    assert httpx.get(f"{url}/health").status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0(small):
    url = small.url
    worker = model_process(small) if sys.platform.startswith("linux") else None
    with httpx.Client(timeout=60) as client:
        with long_stream(url, client, 48) as stream:
            chunks = stream.iter_bytes()
            received = next(chunks)
            small.proc.send_signal(signal.SIGTERM)
            for part in chunks:
                received += part
    events = parse_sse(received.decode("utf-8"))
    assert events[-1] == "[DONE]"
    assert [c["finish_reason"] for e in events[:-1] for c in e["choices"]][-1] == "length"
    assert small.proc.wait(timeout=30) == 0, small.log()
    if worker is not None:  # the model process is gone too
        assert not Path(f"/proc/{worker}").exists() or "Z" == Path(f"/proc/{worker}/stat").read_text().rsplit(")")[1].split()[0]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
