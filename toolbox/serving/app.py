"""The HTTP application: `create_app(loaded, settings)` returns a FastAPI app.

Endpoints: the Azure ML contract (`POST /score`), OpenAI-compatible completions,
chat completions and models, tokenize/detokenize, health and Prometheus metrics.
Generation goes through the `Engine` (one thread, batched); handlers only validate,
build prompts, submit and format. `loaded` may be None: the model is then attached
later with `app.state.server.attach(loaded)` and every endpoint but /health and
/metrics answers 503 until then.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolbox import __version__
from toolbox.backend import GenerationParams
from toolbox.prompts import chat_prompt, from_model_text, to_model_text
from toolbox.serving import schemas as S
from toolbox.serving.engine import Engine, EngineFailure, NotAccepting, Overloaded, SequenceSpec
from toolbox.serving.metrics import Metrics
from toolbox.serving.schemas import APIError, validate

log = logging.getLogger("uvicorn.error")


@dataclass
class Settings:
    """Server settings (the `toolbox serve` options)."""

    served_model_name: str | None = None  # default: the registry id, else the --model value
    api_key: str | None = None
    max_batch_size: int = 16
    max_queue: int = 128
    shutdown_timeout: float = 30.0  # bound on draining in-flight work at shutdown
    max_body_bytes: int = 4 << 20
    retry_after: int = 1  # seconds, for 429/503
    batch_wait: float = 0.03  # after a batch ends, how long the engine may wait for its clients to return
    engine_nice: int = 5  # how far the model's CPU priority sits below the HTTP side's (Linux)
    model_process: bool = False  # the model runs in a child process (a `WorkerModel`), already niced


# -- state ----------------------------------------------------------------------------


class ServerState:
    """What the handlers share: the loaded model (once ready), its engine, metrics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.loaded = None
        self.engine: Engine | None = None
        self.status = "loading"
        self.error: str | None = None
        self.created = int(time.time())
        self.name = settings.served_model_name
        self.names: set[str] = set()

    def attach(self, loaded) -> None:
        """Start serving `loaded` (a `toolbox.loader.Loaded`)."""
        s = self.settings
        nice = 0 if s.model_process else s.engine_nice
        engine = Engine(loaded.model, s.max_batch_size, s.max_queue, self.metrics, s.batch_wait, nice)
        engine.start()
        self.name = s.served_model_name or loaded.ref.name
        aliases = set(loaded.ref.spec.names) if loaded.ref.spec else set()
        self.names = {self.name, loaded.ref.name, *aliases}
        self.aliases = sorted(self.names - {self.name})
        self.loaded, self.engine = loaded, engine
        self.status = "ok"
        self.metrics.model_loaded.set(1)

    def failed(self, exc: BaseException) -> None:
        self.status, self.error = "failed", str(exc)

    def current_status(self) -> str:
        """The status, turned to "failed" once the engine has stopped or the model process died."""
        if self.status == "ok":
            failure = self.engine.failure or getattr(self.loaded.model, "failure", None)
            if failure is not None:
                self.failed(failure)
        return self.status

    def ready(self):
        """(loaded, engine), or 503 while loading / stopping / failed."""
        if self.current_status() != "ok":
            why = {"loading": "the model is still loading", "failed": f"the model failed: {self.error}",
                   "stopping": "the server is shutting down"}[self.status]
            raise APIError(503, why, code=f"model_{self.status}" if self.status != "stopping" else "shutting_down",
                           headers={"Retry-After": str(self.settings.retry_after)})
        return self.loaded, self.engine

    def serving(self, name: str | None):
        """`ready()` for a request naming model `name` (None: any): 503 while not ready, 404 for another model."""
        ready = self.ready()
        self.check_model(name)
        return ready

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(404, f"model: unknown model {name!r}; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    async def shutdown(self) -> None:
        self.status = "stopping" if self.status == "ok" else self.status
        if self.engine is not None:
            clean = await asyncio.to_thread(self.engine.drain, self.settings.shutdown_timeout)
            if not clean:
                log.warning("shutdown: in-flight requests did not finish within %ss", self.settings.shutdown_timeout)
        if self.settings.model_process and self.loaded is not None:
            await asyncio.to_thread(self.loaded.model.close)


# -- request helpers ----------------------------------------------------------------


async def read_json(request: Request, limit: int):
    """The request body as JSON: bounded size, strict UTF-8, no NaN/Infinity, no lone surrogates."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"body: the request body exceeds {limit} bytes", param="body", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "body: a JSON object is required", param="body", code="missing_body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"body: invalid UTF-8 at byte {exc.start}", param="body", code="invalid_utf8") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"body: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                       param="body", code="invalid_json") from None
    except ValueError as exc:
        raise APIError(400, f"body: {exc}", param="body", code="invalid_json") from None
    bad = _surrogate_path(data, ())
    if bad is not None:
        param = S.param_path(bad) or "body"
        raise APIError(400, f"{param}: the string is not valid Unicode (a lone surrogate escape)",
                       param=param, code="invalid_utf8")
    return data


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


def fit_max_tokens(prompt_len: int, requested: int | None, default: int, ctx: int,
                   prompt_param: str, max_param: str) -> int:
    """New tokens for a prompt: the requested number (error when it does not fit), else the default cut to fit."""
    if prompt_len > ctx or (prompt_len == ctx and requested != 0):
        raise APIError(400, f"{prompt_param}: the prompt has {prompt_len} tokens; the model's context is {ctx} tokens "
                       "(prompt + new tokens)", param=prompt_param, code="context_length_exceeded")
    room = ctx - prompt_len
    if requested is None:
        return min(default, room)
    if requested > room:
        raise APIError(400, f"{max_param}: {requested} new tokens + a prompt of {prompt_len} tokens exceed the model's "
                       f"context of {ctx} tokens (at most {room} here)", param=max_param, code="context_length_exceeded")
    return requested


def unsupported(req) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name}: only 0 is supported", param=name, code="unsupported_parameter")
    if req.logit_bias:
        raise APIError(400, "logit_bias: not supported", param="logit_bias", code="unsupported_parameter")


def openai_params(loaded, req, max_new: int) -> GenerationParams:
    """OpenAI's defaults where the API defines them (temperature 1, top_p 1), else the registry's."""
    d = loaded.defaults
    min_new = d.min_new_tokens if req.min_tokens is None else req.min_tokens
    return GenerationParams(
        max_new_tokens=max_new,
        min_new_tokens=min(min_new, max_new),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=d.top_k if req.top_k is None else req.top_k,
        repetition_penalty=d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed,
        stop=tuple(s for s in (req.stop or ()) if s),
    )


def sample_specs(prompts: list[list[int]], params: list[GenerationParams], n: int, nl: bool) -> list[SequenceSpec]:
    """n sequences per prompt (sequence index = prompt_index * n + k); seeded choice k uses seed + k."""
    out = []
    for ids, p in zip(prompts, params):
        for k in range(n):
            seed = None if p.seed is None else (p.seed + k) % (2**63)
            out.append(SequenceSpec(ids, replace(p, seed=seed), nl))
    return out


def check_capacity(engine: Engine, count: int, param: str = "n") -> None:
    why = engine.capacity_error(count)
    if why:
        raise APIError(400, f"{param}: {why}", param=param, code="too_many_sequences")


def submit(state: ServerState, engine: Engine, specs: list[SequenceSpec], count_param: str = "n"):
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


@dataclass
class SeqResult:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    def add(self, out) -> None:
        self.token_ids.append(out.token_id)
        self.logprobs.append(out.logprob)
        self.deltas.append(out.text)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason


class ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(sub, request: Request) -> list[SeqResult]:
    """Every sequence of `sub` to the end; cancels the work if the client disconnects first."""
    results = [SeqResult() for _ in range(sub.count)]

    async def consume():
        async for batch in sub.batches():
            for out in batch:
                results[out.index].add(out)

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


# -- prompts ------------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of one text, on the event loop.

    `Tokenizer.encode` hands even a single text to sentencepiece's thread pool, which
    costs milliseconds on a busy machine; `tokens` encodes in the calling thread
    (same ids).
    """
    return [t.id for t in tokenizer.tokens(text)]


@dataclass
class Prompt:
    ids: list[int]
    text: str  # the prompt as text (echoed)
    offsets: list[int]  # character offset of each prompt token in `text`
    where: str = "prompt"  # the request field it came from


def completion_prompts(req: S.CompletionRequest, tokenizer, need_offsets: bool) -> list[Prompt]:
    p = req.prompt
    if isinstance(p, str):
        items = [p]
    elif not p:
        raise APIError(400, "prompt: the list is empty", param="prompt", code="invalid_value")
    elif isinstance(p[0], int):
        items = [list(p)]
    else:
        items = list(p)
    single = isinstance(p, str) or isinstance(p[0], int)
    prompts = []
    for i, item in enumerate(items):
        where = "prompt" if single else f"prompt[{i}]"
        if not item:
            raise APIError(400, f"{where}: the prompt is empty", param=where, code="invalid_value")
        if isinstance(item, str):
            if need_offsets:
                toks = tokenizer.tokens(item)
                prompts.append(Prompt([t.id for t in toks], item, [t.start for t in toks], where))
            else:
                prompts.append(Prompt(encode(tokenizer, item), item, [], where))
        else:
            bad = next((t for t in item if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"{where}: token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                               param=where, code="invalid_value")
            text, offsets = decode_with_offsets(tokenizer, item)
            prompts.append(Prompt(list(item), text, offsets, where))
    return prompts


def decode_with_offsets(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    from toolbox.streaming import TextAssembler

    text = TextAssembler(tokenizer.token_bytes)
    offsets, out = [], ""
    for t in ids:
        offsets.append(len(out))
        out += text.push(t)
    return out + text.finish(), offsets


def chat_turns(messages: list[S.ChatMessage]) -> list[tuple[str, str]]:
    """user/assistant turns for the template; system/developer text goes in front of the first user message."""
    system = [m.text for m in messages if m.role in ("system", "developer")]
    turns = [(m.role, m.text) for m in messages if m.role in ("user", "assistant")]
    if system:
        preface = "\n".join(system)
        first = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first is None:
            turns.insert(0, ("user", preface))
        else:
            turns[first] = ("user", f"{preface}\n{turns[first][1]}")
    if not turns or turns[-1][0] != "user":
        last = len(messages) - 1
        raise APIError(400, f"messages[{last}].role: the conversation must end with a user message",
                       param=f"messages[{last}].role", code="invalid_value")
    return turns


# -- the app ------------------------------------------------------------------------

JSON_ERRORS = {
    400: {"model": S.ErrorResponse, "description": "A malformed request; `error.param` names the field."},
    401: {"model": S.ErrorResponse, "description": "Missing or wrong API key (when the server has one)."},
    404: {"model": S.ErrorResponse, "description": "Unknown model name."},
    413: {"model": S.ErrorResponse, "description": "Request body too large."},
    429: {"model": S.ErrorResponse, "description": "The queue is full; retry after `Retry-After` seconds."},
    503: {"model": S.ErrorResponse, "description": "The model is loading or the server is stopping (`Retry-After`)."},
    500: {"model": S.ErrorResponse, "description": "A fault in the server or the backend (never a client mistake)."},
}


def _errors(*codes):
    return {c: JSON_ERRORS[c] for c in codes}


def _body(model) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _streaming(model, what: str) -> dict:
    return {200: {"model": model, "description": f"The {what} (JSON), or with `stream: true` a `text/event-stream` "
                  "of `data: {chunk}` events ending with `data: [DONE]`.",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


REQUEST_MODELS = (S.CompletionRequest, S.ChatCompletionRequest, S.AzureRequest, S.TokenizeRequest, S.DetokenizeRequest)


def create_app(loaded, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving `loaded` (or, when None, a model attached later via app.state.server)."""
    settings = settings or Settings()
    state = ServerState(settings)

    async def lifespan(app):
        yield
        await state.shutdown()

    app = FastAPI(
        title="toolbox serve",
        version=__version__,
        description="Inference server for rinna's Japanese GPT-NeoX 3.6B family: the Azure ML real-time contract, "
        "OpenAI-compatible completions and chat, tokenizer endpoints, health and Prometheus metrics.",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.server = state
    if loaded is not None:
        state.attach(loaded)

    # -- errors --

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = tuple(first.get("loc", ()))[1:]
        param = S.param_path(loc) or "body"
        err = APIError(400, f"{param}: {first.get('msg')}", param=param, code="invalid_value")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(500, "internal server error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    # -- health and metrics --

    @app.get("/health", response_model=S.HealthResponse, tags=["server"],
             responses={503: {"model": S.HealthResponse, "description": "Loading, failed or stopping."}})
    async def health():
        """200 once the model is loaded and serving; 503 before (and while shutting down). Never needs a key."""
        body = {"status": state.current_status(), "model": state.name}
        if body["status"] == "ok":
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after)})

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
    async def metrics():
        """Prometheus metrics: requests, tokens in/out, latency and time-to-first-token histograms, queue depth, batch size."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    # -- models --

    def model_card() -> dict:
        loaded, _ = state.ready()
        owner = "rinna" if loaded.ref.spec and loaded.ref.name.startswith("rinna/") else "toolbox"
        return {"id": state.name, "object": "model", "created": state.created, "owned_by": owner,
                "root": loaded.ref.name, "max_model_len": loaded.model.context_length, "aliases": state.aliases}

    @app.get("/v1/models", response_model=S.ModelList, tags=["openai"], responses=_errors(401, 503))
    async def list_models():
        """The served model (one)."""
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=S.ModelCard, tags=["openai"], responses=_errors(401, 404, 503))
    async def get_model(model_id: str):
        """One model by name (the served name or an alias)."""
        card = model_card()
        state.check_model(model_id)
        return card

    # -- tokenizer --

    @app.post("/tokenize", response_model=S.TokenizeResponse, tags=["tokenizer"],
              responses=_errors(400, 401, 404, 413, 503), openapi_extra=_body(S.TokenizeRequest))
    async def tokenize(request: Request):
        """Ids, pieces and character spans of a text (sentencepiece, no special tokens unless asked)."""
        req = validate(S.TokenizeRequest, await read_json(request, settings.max_body_bytes))
        loaded, _ = state.serving(req.model)
        tok = loaded.model.tokenizer
        text = to_model_text(req.text) if req.nl else req.text
        try:
            tokens = tok.tokens(text, bos=req.bos, eos=req.eos, parse_special=req.parse_special)
        except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer without bos
            raise APIError(400, f"text: {exc}", param="text", code="invalid_value") from None
        return {"ids": [t.id for t in tokens], "pieces": [t.piece for t in tokens],
                "offsets": [[t.start, t.end] for t in tokens], "count": len(tokens),
                "max_model_len": loaded.model.context_length}

    @app.post("/detokenize", response_model=S.DetokenizeResponse, tags=["tokenizer"],
              responses=_errors(400, 401, 404, 413, 503), openapi_extra=_body(S.DetokenizeRequest))
    async def detokenize(request: Request):
        """Text of token ids or of pieces (give exactly one of `ids`, `pieces`)."""
        req = validate(S.DetokenizeRequest, await read_json(request, settings.max_body_bytes))
        loaded, _ = state.serving(req.model)
        tok = loaded.model.tokenizer
        if (req.ids is None) == (req.pieces is None):
            raise APIError(400, "ids: give exactly one of ids and pieces", param="ids", code="invalid_value")
        if req.ids is not None:
            ids = req.ids
            for i, t in enumerate(ids):
                if not 0 <= t < tok.vocab_size:
                    raise APIError(400, f"ids[{i}]: token id {t} is outside the vocabulary (0..{tok.vocab_size - 1})",
                                   param=f"ids[{i}]", code="invalid_value")
        else:
            ids = []
            for i, piece in enumerate(req.pieces):
                t = tok.piece_to_id(piece)
                if t is None:
                    raise APIError(400, f"pieces[{i}]: unknown piece {piece!r}", param=f"pieces[{i}]", code="invalid_value")
                ids.append(t)
        text = tok.decode(ids)
        return {"text": from_model_text(text) if req.nl else text, "ids": ids,
                "pieces": [tok.id_to_piece(t) for t in ids]}

    # -- Azure ML --

    @app.post("/score", response_model=S.AzureResponse, tags=["azure-ml"],
              responses=_errors(400, 401, 413, 429, 500, 503), openapi_extra=_body(S.AzureRequest))
    async def score(request: Request):
        """The Azure ML real-time contract: one `{"0": text}` per input string (raw text, no template)."""
        data = await read_json(request, settings.max_body_bytes)
        if not isinstance(data, dict):
            raise APIError(400, "body: must be a JSON object with input_data", param="body", code="invalid_type")
        if "input_data" not in data:
            raise APIError(400, "input_data: required field is missing", param="input_data", code="missing_field")
        inputs = data["input_data"]
        if isinstance(inputs, dict):
            parsed = validate(S.AzureInput, inputs, ("input_data",))
            strings, params = parsed.input_string, parsed.parameters or S.AzureParameters()
            where, str_where = "input_data.parameters", "input_data.input_string"
        elif isinstance(inputs, list):
            strings = validate(S.AzureStrings, inputs, ("input_data",)).root
            raw = data.get("params")
            params = validate(S.AzureParameters, {} if raw is None else raw, ("params",))
            where, str_where = "params", "input_data"
        else:
            raise APIError(400, "input_data: must be an object with input_string, or a list of strings",
                           param="input_data", code="invalid_type")
        loaded, engine = state.ready()
        d, ctx, tok = loaded.defaults, loaded.model.context_length, loaded.model.tokenizer
        if params.do_sample is False:
            temperature = 0.0
        elif params.temperature is not None:
            temperature = params.temperature
        elif params.do_sample:
            temperature = d.temperature if d.do_sample else 1.0
        else:
            temperature = d.temperature if d.do_sample else 0.0
        prompts, gens = [], []
        for i, s in enumerate(strings):
            if not s:
                raise APIError(400, f"{str_where}[{i}]: the input string is empty", param=f"{str_where}[{i}]",
                               code="invalid_value")
            ids = encode(tok, s)
            max_new = fit_max_tokens(len(ids), params.max_new_tokens, d.max_new_tokens, ctx,
                                     f"{str_where}[{i}]", f"{where}.max_new_tokens")
            min_new = d.min_new_tokens if params.min_new_tokens is None else params.min_new_tokens
            prompts.append(ids)
            gens.append(GenerationParams(
                max_new_tokens=max_new, min_new_tokens=min(min_new, max_new), temperature=temperature,
                top_p=d.top_p if params.top_p is None else params.top_p,
                top_k=d.top_k if params.top_k is None else params.top_k,
                repetition_penalty=d.repetition_penalty if params.repetition_penalty is None else params.repetition_penalty,
                seed=params.seed,
            ))
        sub = submit(state, engine, sample_specs(prompts, gens, 1, False), str_where)
        try:
            results = await collect(sub, request)
        except ClientGone:
            return Response(status_code=499)
        full = True if params.return_full_text is None else params.return_full_text
        return JSONResponse([{"0": (s if full else "") + r.text} for s, r in zip(strings, results)])

    # -- OpenAI completions --

    @app.post("/v1/completions", tags=["openai"], responses={**_streaming(S.CompletionResponse, "completion"),
              **_errors(400, 401, 404, 413, 429, 500, 503)}, openapi_extra=_body(S.CompletionRequest))
    async def completions(request: Request):
        """OpenAI completions: raw prompts (no template), `n`, `stop`, `seed`, `logprobs`, `echo`, streaming."""
        req = validate(S.CompletionRequest, await read_json(request, settings.max_body_bytes))
        loaded, engine = state.serving(req.model)
        unsupported(req)
        if req.suffix is not None:
            raise APIError(400, "suffix: not supported", param="suffix", code="unsupported_parameter")
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise APIError(400, "best_of: only best_of == n is supported", param="best_of", code="unsupported_parameter")
        echo, want_lp, stream = bool(req.echo), req.logprobs is not None, bool(req.stream)
        if req.max_tokens == 0 and not echo:
            raise APIError(400, "max_tokens: must be at least 1 (0 only with echo)", param="max_tokens",
                           code="invalid_value")
        tok, ctx = loaded.model.tokenizer, loaded.model.context_length
        prompts = completion_prompts(req, tok, need_offsets=echo and want_lp)
        params = []
        for p in prompts:
            max_new = fit_max_tokens(len(p.ids), req.max_tokens, 16, ctx, p.where, "max_tokens")
            params.append(openai_params(loaded, req, max_new))
        check_capacity(engine, len(prompts) * n)
        prompt_scores = None
        if echo and want_lp:
            try:
                prompt_scores = await engine.call(lambda: loaded.model.score([p.ids for p in prompts]))
            except Overloaded as exc:
                raise APIError(429, str(exc), code="queue_full", type="rate_limit_error",
                               headers={"Retry-After": str(settings.retry_after)}) from None
            except NotAccepting as exc:
                raise APIError(503, str(exc), code="shutting_down") from None
            except Exception as exc:  # noqa: BLE001 - a scoring error on valid input is the server's fault
                raise APIError(500, f"scoring failed: {exc}", code="scoring_failed") from None
        generate = req.max_tokens != 0
        sub = submit(state, engine, sample_specs([p.ids for p in prompts], params, n, False)) if generate else None
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.name
        prompt_tokens = sum(len(p.ids) for p in prompts)

        def prompt_lp(p: Prompt, scores) -> dict:
            lps = [None, *scores.logprobs] if p.ids else []
            return {"tokens": [token_string(tok, t) for t in p.ids], "token_logprobs": lps, "top_logprobs": None,
                    "text_offset": list(p.offsets)}

        def gen_lp(ids, lps, deltas, base: int) -> dict:
            offsets, at = [], base
            for d in deltas:
                offsets.append(at)
                at += len(d)
            return {"tokens": [token_string(tok, t) for t in ids], "token_logprobs": list(lps), "top_logprobs": None,
                    "text_offset": offsets}

        if not stream:
            if sub is not None:
                try:
                    results = await collect(sub, request)
                except ClientGone:
                    return Response(status_code=499)
            else:
                results = [SeqResult(finish_reason="length") for _ in range(len(prompts) * n)]
            choices = []
            for i, r in enumerate(results):
                p = prompts[i // n]
                head = p.text if echo else ""
                choice = {"index": i, "text": head + r.text, "logprobs": None, "finish_reason": r.finish_reason}
                if want_lp:
                    lp = gen_lp(r.token_ids, r.logprobs, r.deltas, len(head))
                    if echo:
                        pl = prompt_lp(p, prompt_scores[i // n])
                        lp = {k: (None if k == "top_logprobs" else pl[k] + lp[k]) for k in lp}
                    choice["logprobs"] = lp
                if req.return_token_ids:
                    choice["token_ids"] = r.token_ids
                    choice["prompt_token_ids"] = p.ids
                choices.append(choice)
            completion_tokens = sum(len(r.token_ids) for r in results)
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                 "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        chunk = chunker(rid, "text_completion", created, name)

        async def events():
            offsets = [len(prompts[i // n].text) if echo else 0 for i in range(len(prompts) * n)]
            completion_tokens = 0
            try:
                if echo:
                    head = []
                    for i in range(len(prompts) * n):
                        p = prompts[i // n]
                        c = {"index": i, "text": p.text, "logprobs": prompt_lp(p, prompt_scores[i // n]) if want_lp else None,
                             "finish_reason": None if generate else "length"}
                        head.append(chunk([c]))
                    yield "".join(head)
                if sub is not None:
                    async for batch in sub.batches():
                        parts = []
                        for out in batch:
                            completion_tokens += 1
                            if not out.text and out.finish_reason is None and not want_lp and not req.return_token_ids:
                                continue
                            c = {"index": out.index, "text": out.text, "logprobs": None,
                                 "finish_reason": out.finish_reason}
                            if want_lp:
                                c["logprobs"] = gen_lp([out.token_id], [out.logprob], [out.text], offsets[out.index])
                            if req.return_token_ids:
                                c["token_ids"] = [out.token_id]
                            offsets[out.index] += len(out.text)
                            parts.append(chunk([c]))
                        if parts:
                            yield "".join(parts)
                if include_usage:
                    yield chunk([], {"usage": usage(prompt_tokens, completion_tokens)})
                yield DONE
            except (EngineFailure, NotAccepting) as exc:
                yield stream_error(exc)
            finally:
                if sub is not None:
                    sub.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # -- OpenAI chat --

    @app.post("/v1/chat/completions", tags=["openai"], responses={**_streaming(S.ChatCompletionResponse, "chat completion"),
              **_errors(400, 401, 404, 413, 429, 500, 503)}, openapi_extra=_body(S.ChatCompletionRequest))
    async def chat_completions(request: Request):
        """OpenAI chat: messages through the series' template (ユーザー/システム, <NL>); see docs/serve.md for `system`."""
        req = validate(S.ChatCompletionRequest, await read_json(request, settings.max_body_bytes))
        loaded, engine = state.serving(req.model)
        unsupported(req)
        n = req.n or 1
        tok, ctx = loaded.model.tokenizer, loaded.model.context_length
        ids = encode(tok, chat_prompt(chat_turns(req.messages)))
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_new = fit_max_tokens(len(ids), requested, loaded.defaults.max_new_tokens, ctx, "messages", max_param)
        params = openai_params(loaded, req, max_new)
        sub = submit(state, engine, sample_specs([ids], [params], n, True))
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.name
        want_lp = bool(req.logprobs)

        def lp_entries(token_ids, lps):
            return [{"token": token_string(tok, t), "logprob": lp, "bytes": list(tok.token_bytes[t]), "top_logprobs": []}
                    for t, lp in zip(token_ids, lps)]

        if not req.stream:
            try:
                results = await collect(sub, request)
            except ClientGone:
                return Response(status_code=499)
            choices = []
            for i, r in enumerate(results):
                c = {"index": i, "message": {"role": "assistant", "content": r.text},
                     "logprobs": {"content": lp_entries(r.token_ids, r.logprobs)} if want_lp else None,
                     "finish_reason": r.finish_reason}
                if req.return_token_ids:
                    c["token_ids"] = r.token_ids
                choices.append(c)
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": name,
                                 "choices": choices,
                                 "usage": usage(len(ids), sum(len(r.token_ids) for r in results))})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        chunk = chunker(rid, "chat.completion.chunk", created, name)

        async def events():
            completion_tokens = 0
            try:
                yield "".join(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]) for i in range(n))
                async for batch in sub.batches():
                    parts = []
                    for out in batch:
                        completion_tokens += 1
                        if not out.text and out.finish_reason is None and not want_lp:
                            continue
                        c = {"index": out.index, "delta": {"content": out.text} if out.text else {},
                             "logprobs": {"content": lp_entries([out.token_id], [out.logprob])} if want_lp else None,
                             "finish_reason": out.finish_reason}
                        if req.return_token_ids:
                            c["token_ids"] = [out.token_id]
                        parts.append(chunk([c]))
                    if parts:
                        yield "".join(parts)
                if include_usage:
                    yield chunk([], {"usage": usage(len(ids), completion_tokens)})
                yield DONE
            except (EngineFailure, NotAccepting) as exc:
                yield stream_error(exc)
            finally:
                sub.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # -- OpenAPI --

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        from pydantic.json_schema import models_json_schema

        _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                     ref_template="#/components/schemas/{model}")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for key, value in defs.get("$defs", {}).items():
            schemas.setdefault(key, value)
        for key in ("HTTPValidationError", "ValidationError"):
            schemas.pop(key, None)
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                responses = op.get("responses", {})
                responses.pop("422", None)  # bodies are validated by the handlers: errors are 400s, declared above
                if path.startswith(("/health",)) or not settings.api_key:
                    responses.pop("401", None)
        if settings.api_key:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            doc["security"] = [{"bearer": []}]
            doc["paths"]["/health"]["get"]["security"] = []
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
    app.add_middleware(_Gate, state=state)
    return app


class _Gate:
    """ASGI wrapper around the app: API-key check (all but /health) and request metrics.

    A plain ASGI layer (not BaseHTTPMiddleware), so streaming responses and client
    disconnects pass through untouched.
    """

    KNOWN = {"/health", "/metrics", "/score", "/tokenize", "/detokenize", "/v1/models", "/v1/completions",
             "/v1/chat/completions", "/openapi.json", "/docs"}

    def __init__(self, app, state: ServerState):
        self.app, self.server = app, state
        key = state.settings.api_key
        self._key = key.encode("utf-8") if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        endpoint = path if path in self.KNOWN else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        started = time.perf_counter()
        status = [0]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self._key is not None and path != "/health" and not self._authorized(scope):
                err = APIError(401, "a valid API key is required: Authorization: Bearer <key>",
                               code="invalid_api_key", type="authentication_error")
                response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send_wrapper)
            await self.app(scope, receive, send_wrapper)
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:
            m = self.server.metrics
            m.requests.labels(endpoint, scope["method"], str(status[0] or 499)).inc()
            m.request_latency.labels(endpoint).observe(time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self._key)
        hmac.compare_digest(b"", self._key)  # same work either way
        return False
