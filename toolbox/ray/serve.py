"""`toolbox serve --ray`: the server's HTTP app as a Ray Serve deployment, one model per replica.

Each replica loads the model and serves the very app `toolbox serve` runs
(`toolbox.serving.app.create_app`: every endpoint, the API key, the queue limit, its
own /metrics); Ray Serve's proxy takes the HTTP connections and spreads requests over
the replicas, and its controller replaces a replica that dies or fails its health check
(a model process that died fails it). With the cuda backend a replica holds one GPU.

`run` is the command (a local cluster, or the one at --ray-address); `build` is the
same application for Ray's own tools (`serve run toolbox.ray.serve:build model=sft`, a
KubeRay RayService config), see docs/scale.md.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

from toolbox.errors import ToolboxError
from toolbox.ray.cluster import check_choice, connected, gpus_per_worker, portable, remote_error, require

APP_NAME = "toolbox"
WHAT = "toolbox serve --ray"


@dataclass(frozen=True)
class Scale:
    """How many replicas: a fixed number, or an autoscaled range (Ray Serve's autoscaler)."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None

    def options(self, target: int) -> dict:
        """Ray Serve deployment options; `target` is the ongoing requests per replica to aim at."""
        if self.autoscale is None:
            return {"num_replicas": self.replicas}
        low, high = self.autoscale
        return {"autoscaling_config": {"min_replicas": low, "initial_replicas": max(low, 1), "max_replicas": high,
                                       "target_ongoing_requests": target}}

    def describe(self) -> str:
        if self.autoscale is None:
            return f"{self.replicas} replica{'s' if self.replicas != 1 else ''}"
        return f"{self.autoscale[0]}-{self.autoscale[1]} replicas (autoscaled)"


def parse_autoscale(text: str) -> tuple[int, int]:
    """`MIN:MAX` -> (min, max), with 0 <= MIN <= MAX and MAX >= 1."""
    low, colon, high = text.partition(":")
    if not colon or not low.strip().isdigit() or not high.strip().isdigit():
        raise ToolboxError(f"--autoscale {text}: expected MIN:MAX, e.g. 1:4")
    low_n, high_n = int(low), int(high)
    if high_n < 1 or low_n > high_n:
        raise ToolboxError(f"--autoscale {text}: expected 0 <= MIN <= MAX and MAX >= 1")
    return low_n, high_n


class Replica:
    """One replica: the model, loaded when Ray constructs it, and the app serving it.

    Ray wraps the class as the deployment's ingress (`serve.ingress()` late-bound: it asks
    `__serve_build_asgi_app__` for the app once the constructor has returned), so the
    replica only counts as started, and only gets requests, once its model is loaded.
    """

    async def __init__(self, choice, settings, threads: int | None):
        import asyncio
        from dataclasses import replace

        from ray import serve

        from toolbox.serving.app import create_app

        # loading takes seconds to minutes: on a thread, so the replica keeps answering Ray meanwhile
        model = await asyncio.to_thread(_load, replace(choice, threads=choice.threads or threads), settings)
        self._app = create_app(model, settings)
        self._app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_tag)

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Ray Serve's health probe: a failed model (its process died, the engine stopped) fails it,
        and the controller then replaces the replica."""
        state = self._app.state.server
        if state.current_status() == "failed":
            raise RuntimeError(f"the model failed: {state.error}")


def _load(choice, settings):
    """The replica's model: in a process of its own (`--model-process`) or in the replica's."""
    if not settings.model_process:
        return choice.load()
    from toolbox.serving.worker import load_in_process

    options = choice.load_options()
    return load_in_process(choice.model, choice.revision, choice.backend, options, settings.engine_nice)


class ReplicaHeader:
    """ASGI layer naming the replica that answered in each response (`x-toolbox-replica`), to tell
    replicas apart in logs, load tests and bug reports."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-toolbox-replica", replica.encode("ascii", "replace"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def application(choice, settings, scale: Scale, cluster_gpus: float = 0.0):
    """The bound Ray Serve application: `Replica` deployed with its resources and scaling."""
    require(WHAT, "ray.serve")
    from ray import serve

    cpus = choice.threads or 1  # a replica's torch threads, and the CPUs Ray reserves for it
    gpus = gpus_per_worker(choice.backend, choice.device, cluster_gpus)
    ingress = serve.ingress()(Replica)
    deployment = serve.deployment(
        ingress,
        name="toolbox",
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        # a replica takes as much as its own queue admits; beyond that it answers 429 itself
        max_ongoing_requests=settings.max_batch_size + settings.max_queue,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        health_check_period_s=5,
        max_constructor_retry_count=3,
        **scale.options(target=settings.max_batch_size),
    )
    return deployment.bind(portable(choice), settings, cpus)


def build(args: dict):
    """The application for Ray's tools: `serve run toolbox.ray.serve:build model=sft replicas=2`, or a
    RayService's `import_path` with `args` (model, backend, dtype, device, threads, revision,
    replicas, autoscale "MIN:MAX", api_key, served_model_name, max_batch_size, max_queue,
    shutdown_timeout, model_process). Without api_key, $TOOLBOX_API_KEY where the app is built
    (a secret in the pods' environment) sets it."""
    from toolbox.commands.options import ModelChoice
    from toolbox.serving.state import Settings

    known = {"model", "backend", "dtype", "device", "threads", "revision", "replicas", "autoscale", "api_key",
             "served_model_name", "max_batch_size", "max_queue", "shutdown_timeout", "model_process"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ToolboxError(f"toolbox.ray.serve:build: unknown argument {unknown[0]!r}; known: {', '.join(sorted(known))}")

    def number(key, default):
        try:
            return int(args.get(key, default))
        except (TypeError, ValueError):
            raise ToolboxError(f"toolbox.ray.serve:build: {key} must be a whole number, got {args[key]!r}") from None

    threads = number("threads", 0) or None
    choice = ModelChoice(args.get("model"), args.get("revision"), args.get("backend", "auto"), args.get("device"),
                         args.get("dtype"), threads)
    defaults = Settings()
    model_process = str(args.get("model_process", "true")).lower() not in ("0", "false", "no")
    settings = Settings(served_model_name=args.get("served_model_name"),
                        api_key=args.get("api_key") or os.environ.get("TOOLBOX_API_KEY") or None,
                        max_batch_size=number("max_batch_size", defaults.max_batch_size),
                        max_queue=number("max_queue", defaults.max_queue),
                        shutdown_timeout=float(args.get("shutdown_timeout", defaults.shutdown_timeout)),
                        model_process=model_process)
    autoscale = parse_autoscale(str(args["autoscale"])) if args.get("autoscale") else None
    scale = Scale(number("replicas", 1), autoscale)
    gpus = 1.0 if choice.backend == "auto" and _cluster_gpus() else 0.0
    return application(choice, settings, scale, gpus)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def run(choice, settings, scale: Scale, host: str, port: int, address: str | None, root_path: str = "",
        log_level: str = "info", access_log: bool = True) -> None:
    """`toolbox serve --ray`: deploy, say where, serve until SIGINT/SIGTERM, then take the deployment down."""
    check_choice(choice)
    with connected(address, WHAT, "ray.serve") as ray:
        from ray import serve

        try:
            serve.start(http_options={"host": host, "port": port, "root_path": root_path},
                        logging_config={"log_level": log_level.upper(), "enable_access_log": access_log})
            app = application(choice, settings, scale, float(ray.cluster_resources().get("GPU", 0)))
            serve.run(app, name=APP_NAME, route_prefix="/")
        except ToolboxError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray reports a replica's failure as its own exception types
            raise ToolboxError(f"cannot serve: {remote_error(exc)}") from None
        import click

        click.echo(f"toolbox serve: {scale.describe()} of {choice.model or 'embedded'} on Ray at "
                   f"http://{host}:{port}{root_path}; ready", err=True)
        try:
            wait_for_signal()
        finally:
            serve.delete(APP_NAME)
            if address is None:
                serve.shutdown()


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (the handlers are restored afterwards)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def from_cli(use_ray: bool, choice, *, host: str, port: int, replicas: int | None, autoscale: str | None,
             address: str | None, api_key, served_model_name, max_batch_size, max_queue, shutdown_timeout,
             root_path, model_process, engine_nice, log_level, access_log) -> None:
    """`toolbox serve` with a Ray option: check the combination, then `run`."""
    import click

    from toolbox.serving.network import check_port, loopback
    from toolbox.serving.state import Settings

    if not use_ray:
        raise click.UsageError("--replicas, --autoscale and --ray-address go with --ray")
    if replicas is not None and autoscale is not None:
        raise click.UsageError("--replicas and --autoscale: give one (a fixed count, or a range)")
    scale = Scale(replicas or 1, parse_autoscale(autoscale) if autoscale else None)
    if not loopback(host) and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    settings = Settings(served_model_name=served_model_name, api_key=api_key or None, max_batch_size=max_batch_size,
                        max_queue=max_queue, shutdown_timeout=shutdown_timeout, engine_nice=engine_nice,
                        model_process=model_process)
    if address is None and not os.environ.get("RAY_ADDRESS"):
        check_port(host, port)  # Ray's proxy takes the port on this machine: a clear error now, not a failed deploy
    run(choice, settings, scale, host, port, address, root_path, log_level, access_log)
