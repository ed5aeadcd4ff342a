"""What the endpoint families share: reading bodies, submitting to the engine, collecting
results, streaming chunks, and turning library errors into API errors."""

from __future__ import annotations

import asyncio
import json
import re

from fastapi import Request

from toolbox.context import ContextError, cap_new_tokens
from toolbox.params import ParamError
from toolbox.results import Sample
from toolbox.serving import schemas as S
from toolbox.serving.engine import Engine, EngineFailure, NotAccepting, Overloaded, SequenceSpec
from toolbox.serving.schemas import APIError


def state_of(request: Request):
    """The `ServerState` of the app handling `request`."""
    return request.app.state.server


#: JSON nested deeper than this is refused (no request needs it; Python's parser would recurse)
MAX_DEPTH = 64
#: bodies larger than this are parsed off the event loop, so other requests and streams go on
OFFLOAD_BYTES = 64 << 10


async def read_json(request: Request, limit: int):
    """The request body as JSON: bounded size and depth, strict UTF-8, no NaN/Infinity, no lone surrogates."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"body: the request body exceeds {limit} bytes", param="body", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "body: a JSON object is required", param="body", code="missing_body")
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


def parse_json(raw: bytes):
    """`read_json`'s checks on a whole body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"body: invalid UTF-8 at byte {exc.start}", param="body", code="invalid_utf8") from None
    if _depth(text) > MAX_DEPTH:
        raise APIError(400, f"body: JSON nested deeper than {MAX_DEPTH} levels", param="body", code="invalid_json")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"body: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                       param="body", code="invalid_json") from None
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"body: {exc}", param="body", code="invalid_json") from None
    bad = _surrogate_path(data, ())
    if bad is not None:
        param = S.param_path(bad) or "body"
        raise APIError(400, f"{param}: the string is not valid Unicode (a lone surrogate escape)",
                       param=param, code="invalid_utf8")
    return data


_BRACKETS = re.compile(r'[\[\]{}"\\]')


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string, escaped_at = False, -1
    for m in _BRACKETS.finditer(text):
        c = m.group()
        if in_string:
            if m.start() == escaped_at:  # the character after a backslash
                continue
            if c == "\\":
                escaped_at = m.end()
            elif c == '"':
                in_string = False
            continue
        if c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _surrogate_path(value, path):
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _surrogate_path(k, path) or _surrogate_path(v, (*path, k))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _surrogate_path(v, (*path, i))
            if found is not None:
                return found
    return None


def fit_new_tokens(prompt_len: int, requested: int | None, default: int, context: int, where: str,
                   max_field: str) -> int:
    """`toolbox.context.cap_new_tokens`, its error as a 400 naming the field."""
    try:
        return cap_new_tokens(prompt_len, requested, default, context, where, max_field)
    except ContextError as exc:
        raise APIError(400, str(exc), param=exc.field, code="context_length_exceeded") from None


def param_error(exc: ParamError, names: dict[str, str] | None = None, prefix: str = "") -> APIError:
    """A generation setting the library refused, as a 400 naming the request's own field."""
    field = prefix + (names or {}).get(exc.setting, exc.setting)
    return APIError(400, f"{field}: {exc.reason}", param=field, code="invalid_value")


def sample_specs(prompts: list[list[int]], params: list, n: int, nl: bool) -> list[SequenceSpec]:
    """n sequences per prompt (sequence index = prompt_index * n + k); seeded sample k uses seed + k."""
    from dataclasses import replace

    from toolbox.params import sample_seed

    return [SequenceSpec(ids, replace(p, seed=sample_seed(p.seed, k)), nl)
            for ids, p in zip(prompts, params) for k in range(n)]


def check_capacity(engine: Engine, count: int, param: str = "n") -> None:
    why = engine.capacity_error(count)
    if why:
        raise APIError(400, f"{param}: {why}", param=param, code="too_many_sequences")


def submit(state, engine: Engine, specs: list[SequenceSpec], count_param: str = "n"):
    check_capacity(engine, len(specs), count_param)
    try:
        sub = engine.submit(specs)
    except Overloaded as exc:
        raise APIError(429, str(exc), code="queue_full", type="rate_limit_error",
                       headers={"Retry-After": str(state.settings.retry_after)}) from None
    except NotAccepting as exc:
        raise APIError(503, str(exc), code="shutting_down",
                       headers={"Retry-After": str(state.settings.retry_after)}) from None
    state.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in specs))
    return sub


class ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(sub, request: Request) -> list[Sample]:
    """Every sequence of `sub` to the end; cancels the work if the client disconnects first."""
    results = [Sample() for _ in range(sub.count)]

    async def consume():
        async for batch in sub.batches():
            for out in batch:
                results[out.index].add(out.token_id, out.logprob, out.text, out.finish_reason, out.top)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer in done:
            consumer.result()
            return results
        raise ClientGone()
    except EngineFailure as exc:
        raise APIError(500, str(exc), code="generation_failed") from None
    except NotAccepting as exc:
        raise APIError(503, str(exc), code="shutting_down") from None
    finally:
        watcher.cancel()
        consumer.cancel()
        sub.cancel()


def token_string(tokenizer, token_id: int) -> str:
    """A token as text; incomplete UTF-8 as `bytes:\\xNN`, control tokens as their piece (`</s>`)."""
    raw = tokenizer.token_bytes[token_id]
    if not raw:
        return tokenizer.id_to_piece(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _dumps(data) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def chunker(rid: str, obj: str, created: int, model: str):
    """`chunk(choices, extra)` -> one SSE event of a stream; the constant head is encoded once."""
    head = f'data: {{"id":{_dumps(rid)},"object":{_dumps(obj)},"created":{created},"model":{_dumps(model)},"choices":'

    def chunk(choices, extra=None):
        tail = "".join(f",{_dumps(k)}:{_dumps(v)}" for k, v in extra.items()) if extra else ""
        return f"{head}{_dumps(choices)}{tail}}}\n\n"

    return chunk


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def stream_error(exc: BaseException) -> str:
    return sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": "generation_failed"}})


#: prompts with more characters than this in all are tokenized off the event loop
OFFLOAD_CHARS = 4096


async def offload(fn, *args, size: int, **kwargs):
    """`fn(*args, **kwargs)`, on a worker thread when `size` (characters to process) is large, so
    that a big request does not hold up health checks and other clients' streams."""
    if size > OFFLOAD_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def top_entries(tokenizer, top) -> dict[str, float]:
    """OpenAI's legacy `top_logprobs` entry: token text -> logprob, most likely first."""
    return {token_string(tokenizer, t): lp for t, lp in top}


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of one text, in the calling thread.

    `Tokenizer.encode` hands even a single text to sentencepiece's thread pool, which
    costs milliseconds on a busy machine; `tokens` encodes in the calling thread
    (same ids).
    """
    return [t.id for t in tokenizer.tokens(text)]


JSON_ERRORS = {
    400: {"model": S.ErrorResponse, "description": "A malformed request; `error.param` names the field."},
    401: {"model": S.ErrorResponse, "description": "Missing or wrong API key (when the server has one)."},
    404: {"model": S.ErrorResponse, "description": "Unknown model name."},
    413: {"model": S.ErrorResponse, "description": "Request body too large."},
    429: {"model": S.ErrorResponse, "description": "The queue is full; retry after `Retry-After` seconds."},
    503: {"model": S.ErrorResponse, "description": "The model is loading or the server is stopping (`Retry-After`)."},
    500: {"model": S.ErrorResponse, "description": "A fault in the server or the backend (never a client mistake)."},
}


def errors(*codes):
    """OpenAPI `responses` for these error statuses."""
    return {c: JSON_ERRORS[c] for c in codes}


def body(model) -> dict:
    """OpenAPI `requestBody` for a handler that validates its body itself (with `model`)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


#: one server-sent event, as OpenAPI before 3.2 describes an event stream (a schema per event)
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk, or `[DONE]` at the end"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def streaming(model, what: str) -> dict:
    return {200: {"model": model, "description": f"The {what} (JSON), or with `stream: true` a `text/event-stream` "
                  "of `data: {chunk}` events ending with `data: [DONE]`.",
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}}}
