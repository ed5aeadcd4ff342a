"""The server's handlers in-process (`httpx.ASGITransport`), the engine's fairness and isolation.

The real-process tests (signals, the model process, HTTP clients over sockets) are in
tests/test_serve.py; these need no port and check that no request can hurt another:
extreme sampling values beside healthy streams, a failing row isolated from its batch,
large requests off the event loop, fair admission, a reader that stops reading.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

import toolbox
from toolbox.serving.app import Settings, create_app
from toolbox.serving.engine import Engine, EngineFailure, SequenceSpec
from toolbox.types import GenerationParams

PROMPT = "吾輩は猫である。名前はまだ無い。"


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return toolbox.load(threads=1)


@pytest.fixture(scope="module")
def app(model):
    return create_app(model, Settings(served_model_name="toy", max_batch_size=8, max_queue=64))


def post_all(app, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Send the requests concurrently to the app; their responses, in order."""

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app",
                                     timeout=120) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))

    return asyncio.run(run())


def texts_of_stream(body: str) -> tuple[str, list]:
    events = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: {")]
    errors = [e for e in events if "error" in e]
    return "".join(c["text"] for e in events if "choices" in e for c in e["choices"]), errors


POISON = [
    {"temperature": 1e-30},  # underflows: logits / T overflow float32
    {"temperature": 1e-45, "top_p": 1e-30},
    {"repetition_penalty": 1e-30},
    {"repetition_penalty": 10, "temperature": 2, "top_k": 10**18},
    {"top_p": 5e-324},  # the smallest subnormal double
    {"min_tokens": 8, "seed": 2**63 - 1, "temperature": 1e-7},
]


def test_extreme_sampling_values_never_hurt_other_requests(app):
    healthy = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True}
    (alone,) = post_all(app, [("/v1/completions", healthy)])
    expected, errors = texts_of_stream(alone.text)
    assert alone.status_code == 200 and not errors
    requests = []
    for i, poison in enumerate(POISON):
        requests.append(("/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "stream": bool(i % 2), **poison}))
        requests.append(("/v1/completions", healthy))
    responses = post_all(app, requests)
    for (_, body), r in zip(requests, responses):
        assert r.status_code in (200, 400), (body, r.text)
        if body is healthy:
            text, errors = texts_of_stream(r.text)
            assert r.status_code == 200 and not errors and text == expected
        elif r.status_code == 200 and body.get("stream"):
            assert not texts_of_stream(r.text)[1], body


def test_a_failing_row_is_isolated_from_its_batch(model, monkeypatch):
    """A fault in one row's step (injected) fails that request; the rows beside it go on unchanged."""
    from toolbox.runtime.batcher import ContinuousBatcher

    prompts = [model.tokenize(p) for p in ("猫", "主人は", PROMPT)]
    params = GenerationParams(max_new_tokens=12, temperature=0.0)

    def run(poisoned: int | None):
        batcher = model.loaded.batcher(4)
        for i, ids in enumerate(prompts):
            batcher.add(toolbox.types.SequenceRequest(i, ids, params))
        real = ContinuousBatcher._sample

        def sample(self, logits, rows, seen):
            if any(r.request.id == poisoned for r in rows) and rows[0].produced >= 3:
                raise RuntimeError("injected fault")
            return real(self, logits, rows, seen)

        out: dict[int, list[int]] = {}
        failed = []
        with monkeypatch.context() as m:
            m.setattr(ContinuousBatcher, "_sample", sample)
            while batcher.pending():
                for e in batcher.step():
                    out.setdefault(e.seq, []).append(e.token_id)
                failed += batcher.take_refused()
        return out, failed

    clean, none = run(None)
    assert not none
    got, failed = run(1)
    assert [request_id for request_id, _ in failed] == [1] and "injected fault" in str(failed[0][1])
    assert got[0] == clean[0] and got[2] == clean[2]  # the neighbours are untouched
    assert got[1] == clean[1][:3]  # the failing row stopped where the fault hit


def test_request_errors_name_the_field(app):
    cases = [
        ({"prompt": "a", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"prompt": "a", "top_k": -1}, "top_k"),
    ]
    chat = [
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
         "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ]
    score = [({"input_data": {"input_string": ["a"]}, "params": {"max_new_tokens": 2}}, "params")]
    requests = ([("/v1/completions", b) for b, _ in cases] + [("/v1/chat/completions", b) for b, _ in chat]
                + [("/score", b) for b, _ in score])
    for (_, body), r, field in zip(requests, post_all(app, requests), [f for _, f in cases + chat + score]):
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == field, r.text
    # a harmless response_format is fine
    ok = {"messages": [{"role": "user", "content": "猫"}], "max_tokens": 2, "response_format": {"type": "text"}}
    assert post_all(app, [("/v1/chat/completions", ok)])[0].status_code == 200


def test_deep_json_huge_bodies_and_head_health(app):
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            deep = await client.post("/v1/completions", content=b"[" * 5000 + b"]" * 5000,
                                     headers={"Content-Type": "application/json"})
            head = await client.head("/health")
            # a large prompt (tokenized off the event loop) while /health keeps answering
            big = client.post("/tokenize", json={"text": "吾輩は猫である。" * 20000})
            health = [client.get("/health") for _ in range(5)]
            return deep, head, await asyncio.gather(big, *health)

    deep, head, (big, *health) = asyncio.run(run())
    assert deep.status_code == 400 and deep.json()["error"]["param"] == "body"
    assert "nested deeper" in deep.json()["error"]["message"]
    assert head.status_code == 200 and head.content == b""
    assert big.status_code == 200 and big.json()["count"] > 20000
    assert all(h.status_code == 200 for h in health)


def test_vllm_tokenizer_endpoints_and_info(app, model):
    r1, r2, r3 = post_all(app, [("/tokenize", {"prompt": PROMPT, "add_special_tokens": False}),
                                ("/tokenize", {"prompt": PROMPT, "add_special_tokens": True}),
                                ("/detokenize", {"tokens": model.tokenize(PROMPT)})])
    assert r1.json()["tokens"] == model.tokenizer.sp.encode(PROMPT)  # sentencepiece's own ids
    assert r2.json()["tokens"] == r1.json()["tokens"] + [model.tokenizer.special_ids["eos"]]
    assert r3.json()["prompt"] == PROMPT

    async def info():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.get("/tokenizer_info")

    body = asyncio.run(info()).json()
    assert body["eos_token"] == "</s>" and body["model_max_length"] == model.context_length
    assert body["chat_template"] is None  # the embedded model is not an instruction model


def test_large_n_does_not_hold_the_batch(model):
    """Round-robin admission: a request with many samples shares the batch with those behind it."""
    engine = Engine(model.loaded, max_batch_size=2, max_queue=64)
    engine.start()
    try:
        big = [SequenceSpec(model.tokenize("猫"), GenerationParams(max_new_tokens=24, min_new_tokens=24,
                                                                     temperature=0.0))] * 12
        small = [SequenceSpec(model.tokenize("主人は"), GenerationParams(max_new_tokens=2, temperature=0.0))]

        async def run():
            order = []

            async def consume(sub, name):
                async for out in sub.outputs():
                    if out.finish_reason:
                        order.append(name)

            a = engine.submit(big)
            b = engine.submit(small)
            await asyncio.gather(consume(a, "big"), consume(b, "small"))
            return order

        order = asyncio.run(run())
        # the small request finished while most of the big one's 12 sequences were still to come
        assert order.index("small") < 4, order
    finally:
        engine.drain(10)


def test_a_reader_that_stops_reading_is_cancelled(model):
    engine = Engine(model.loaded, max_batch_size=2, max_queue=4, stall_timeout=0.3)
    engine.start()
    try:
        spec = SequenceSpec(model.tokenize("猫"), GenerationParams(max_new_tokens=400, min_new_tokens=400,
                                                                     temperature=0.0))

        async def run():
            sub = engine.submit([spec])
            outputs = sub.outputs()
            await outputs.__anext__()  # reads once, then stops
            await asyncio.sleep(1.5)
            with pytest.raises(EngineFailure, match="read nothing"):
                async for _ in outputs:
                    pass

        asyncio.run(run())
        deadline = time.monotonic() + 5
        while engine.admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.admitted == 0  # its place in the batch is free again
    finally:
        engine.drain(10)
