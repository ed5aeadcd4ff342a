"""What every handler shares: the server's settings, the model (once loaded), its engine, metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from toolbox.serving.engine import Engine
from toolbox.serving.metrics import Metrics
from toolbox.serving.schemas import APIError

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


class ServerState:
    """The model (a `toolbox.Model`, once attached), its engine, status and metrics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.model = None
        self.engine: Engine | None = None
        self.status = "loading"
        self.error: str | None = None
        self.created = int(time.time())
        self.name = settings.served_model_name
        self.names: set[str] = set()
        self.aliases: list[str] = []
        self.head_lock = threading.Lock()  # a fine-tuned head runs one batch at a time

    def attach(self, model) -> None:
        """Start serving `model` (a `toolbox.Model`; a fine-tuned head needs no engine)."""
        s = self.settings
        engine = None
        if model.head is None:
            nice = 0 if s.model_process else s.engine_nice
            engine = Engine(model.loaded, s.max_batch_size, s.max_queue, self.metrics, s.batch_wait, nice)
            engine.start()
        self.name = s.served_model_name or model.name
        aliases = set(model.spec.names) if model.spec else set()
        self.names = {self.name, model.name, *aliases}
        self.aliases = sorted(self.names - {self.name})
        self.model, self.engine = model, engine
        self.status = "ok"
        self.metrics.model_loaded.set(1)

    def failed(self, exc: BaseException) -> None:
        self.status, self.error = "failed", str(exc)
        self.metrics.model_loaded.set(0)

    def current_status(self) -> str:
        """The status, turned to "failed" once the engine has stopped or the model process died."""
        if self.status == "ok" and self.engine is not None:
            failure = self.engine.failure or getattr(self.model.loaded, "failure", None)
            if failure is not None:
                self.failed(failure)
        return self.status

    def ready(self):
        """(model, engine), or 503 while loading / stopping / failed."""
        if self.current_status() != "ok":
            why = {"loading": "the model is still loading", "failed": f"the model failed: {self.error}",
                   "stopping": "the server is shutting down"}[self.status]
            raise APIError(503, why, code=f"model_{self.status}" if self.status != "stopping" else "shutting_down",
                           headers={"Retry-After": str(self.settings.retry_after)})
        return self.model, self.engine

    def serving(self, name: str | None):
        """`ready()` for a request naming model `name` (None: any): 503 while not ready, 404 for another model."""
        ready = self.ready()
        self.check_model(name)
        return ready

    def generating(self, name: str | None):
        """`serving()` for an endpoint that generates: a 400 when the model is a fine-tuned head."""
        model, engine = self.serving(name)
        if model.head is not None:
            task = model.head.task
            raise APIError(400, f"model: {self.name} is a {task} model, not a language model; use /v1/{task} "
                           "or /score", param="model", code="wrong_model_type")
        return model, engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(404, f"model: unknown model {name!r}; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def begin_shutdown(self) -> None:
        """Start draining now (SIGTERM): refuse new work, let in-flight requests finish within the
        shutdown timeout, then fail what is left with a proper error (a JSON 503, an error event in
        a stream). The HTTP server's own grace period must be longer, so that it never cuts a
        response off before that happens."""
        if self.engine is None or self.status not in ("ok", "loading"):
            return
        self.status = "stopping"
        engine, timeout = self.engine, self.settings.shutdown_timeout
        threading.Thread(target=engine.drain, args=(timeout,), name="toolbox-drain", daemon=True).start()

    async def shutdown(self) -> None:
        self.status = "stopping" if self.status == "ok" else self.status
        if self.engine is not None:
            clean = await asyncio.to_thread(self.engine.drain, self.settings.shutdown_timeout)
            if not clean:
                log.warning("shutdown: in-flight requests did not finish within %ss", self.settings.shutdown_timeout)
        if self.model is not None:
            await asyncio.to_thread(self.model.close)
