"""The HTTP application: `create_app(model, settings)` returns the FastAPI app.

Endpoint families live in modules of their own, each an `APIRouter` of plain handler
functions: `openai` (/v1/models, /v1/completions, /v1/chat/completions), `azure`
(/score), `tokenizer` (/tokenize, /detokenize, /tokenizer_info), `heads` (/v1/classify,
/v1/tag for fine-tuned heads) and `health` (/health, /metrics).
Generation goes through the `Engine` (one thread, batched); handlers validate, build
prompts with the library, submit and format. `model` (a `toolbox.Model`) may be None:
it is then attached later with `app.state.server.attach(model)` and every endpoint but
/health and /metrics answers 503 until then.
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolbox import __version__
from toolbox.serving import azure, heads, health, openai, tokenizer
from toolbox.serving import schemas as S
from toolbox.serving.schemas import APIError
from toolbox.serving.state import ServerState, Settings

log = logging.getLogger("uvicorn.error")

__all__ = ["Settings", "create_app"]

REQUEST_MODELS = (S.CompletionRequest, S.ChatCompletionRequest, S.AzureRequest, S.TokenizeRequest, S.DetokenizeRequest,
                  S.HeadRequest)


def create_app(model=None, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving `model` (or, when None, a model attached later via app.state.server)."""
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
    if model is not None:
        state.attach(model)
    for module in (health, openai, azure, tokenizer, heads):
        app.include_router(module.router)
    _error_handlers(app)

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
        S.document_limits(schemas, settings.max_batch_size + settings.max_queue, settings.max_body_bytes)
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


def _error_handlers(app: FastAPI) -> None:
    """Every error is OpenAI's JSON error body; a fault never leaks a traceback to the client."""

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


class _Gate:
    """ASGI wrapper around the app: API-key check (all but /health) and request metrics.

    A plain ASGI layer (not BaseHTTPMiddleware), so streaming responses and client
    disconnects pass through untouched.
    """

    KNOWN = {"/health", "/metrics", "/score", "/tokenize", "/detokenize", "/tokenizer_info", "/v1/models",
             "/v1/classify", "/v1/tag",
             "/v1/completions",
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
        status, complete = [0], [False]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete[0] = True
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
            # a response the client did not wait for to the end (a stream it left) counts as 499
            m.requests.labels(endpoint, scope["method"], str(status[0] if complete[0] else 499)).inc()
            m.request_latency.labels(endpoint).observe(time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self._key)
        hmac.compare_digest(b"", self._key)  # same work either way
        return False
