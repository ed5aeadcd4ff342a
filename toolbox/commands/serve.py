"""`toolbox serve`: an HTTP inference server for one model (Azure ML contract + OpenAI-compatible API)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import replace

import click

from toolbox.commands.options import model_load_options
from toolbox.errors import ToolboxError
from toolbox.serving.network import check_port, loopback


def _is_head(choice) -> bool:
    """A fine-tuned classifier or tagger: served from this process (no decoding loop to keep apart)."""
    from toolbox.checkpoints import checkpoint_dir, parse_model
    from toolbox.heads import head_task

    return head_task(checkpoint_dir(parse_model(choice.model, choice.revision))) is not None


def serve_threads(threads: int | None) -> int:
    """The model process's CPU threads: as asked, else one core fewer than the machine has, so that
    the HTTP side always has a core and a busy host slows the server down gracefully."""
    return threads or max(1, (os.cpu_count() or 1) - 1)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes the server to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--api-key", envvar="TOOLBOX_API_KEY", default=None, metavar="KEY",
              help="Require `Authorization: Bearer KEY` on every endpoint but /health [env TOOLBOX_API_KEY].")
@click.option("--served-model-name", default=None, metavar="NAME",
              help="The model's name in the API (default: the registry id, else the --model value).")
@click.option("--max-batch-size", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Sequences generated together in one batch.")
@click.option("--max-queue", type=click.IntRange(0), default=128, show_default=True,
              help="Sequences that may wait for the batch; beyond that requests get 429 with Retry-After.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30, show_default=True,
              help="On SIGTERM, seconds to let in-flight requests finish before they are cut off.")
@click.option("--root-path", default="", help="URL prefix when a reverse proxy mounts the server under a sub-path.")
@click.option("--model-process/--no-model-process", default=os.name == "posix",
              help="Run the model in a process of its own (the default on POSIX), so requests and streams never "
                   "wait for the model's Python code; --no-model-process runs it on a thread of the server.")
@click.option("--engine-nice", type=click.IntRange(0, 19), default=5, show_default=True,
              help="Run the model this many nice levels below the HTTP side (Linux), so requests and streams "
                   "stay responsive while the model keeps the CPU busy; 0 = same priority.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="Server log level.")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="Log every request.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve: replicas of this server, one model each "
              "(docs/scale.md).")
@click.option("--replicas", type=click.IntRange(min=1), default=None, help="With --ray: replicas [default: 1].")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="With --ray: let Ray Serve scale the replicas.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="With --ray: the cluster (host:port, ray://host:port, auto) [default: $RAY_ADDRESS, else a local one].")
@model_load_options
def serve(host, port, api_key, served_model_name, max_batch_size, max_queue, shutdown_timeout, root_path, model_process,
          engine_nice, log_level, access_log, use_ray, replicas, autoscale, ray_address, choice):
    """Serve the model over HTTP: Azure ML /score, OpenAI /v1/completions and /v1/chat/completions.

    Also /v1/models, /tokenize, /detokenize, /health (503 until the model is loaded)
    and /metrics (Prometheus). Concurrent requests are batched. The model loads in
    the background while the port is already open. SIGTERM stops accepting
    connections, lets in-flight requests finish (at most --shutdown-timeout
    seconds) and exits 0. The model uses one CPU thread fewer than the machine has
    unless --threads says otherwise (the HTTP side keeps a core). See docs/serve.md.

    \b
    Examples:
      toolbox serve                                  # embedded model on 127.0.0.1:8000
      toolbox serve -m sft --api-key "$KEY" --host 0.0.0.0 --port 8080
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "吾輩は猫である。", "max_tokens": 32}'
    """
    if use_ray or replicas or autoscale or ray_address:
        from toolbox.ray.serve import from_cli

        return from_cli(use_ray, choice, host=host, port=port, replicas=replicas, autoscale=autoscale,
                        address=ray_address, api_key=api_key, served_model_name=served_model_name,
                        max_batch_size=max_batch_size, max_queue=max_queue, shutdown_timeout=shutdown_timeout,
                        root_path=root_path, model_process=model_process, engine_nice=engine_nice,
                        log_level=log_level, access_log=access_log)
    choice.check()  # an unknown model, backend or option fails here, before the port opens
    choice = replace(choice, threads=serve_threads(choice.threads))
    if not loopback(host) and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)

    try:
        import uvicorn

        from toolbox.serving.app import Settings, create_app
    except ImportError as exc:
        raise ToolboxError(f"toolbox serve needs fastapi, uvicorn and prometheus_client ({exc})") from None
    from toolbox.serving.worker import load_in_process

    settings = Settings(served_model_name=served_model_name, api_key=api_key or None, max_batch_size=max_batch_size,
                        max_queue=max_queue, shutdown_timeout=shutdown_timeout, engine_nice=engine_nice,
                        model_process=model_process)
    app = create_app(None, settings)
    state = app.state.server
    check_port(host, port)
    # uvicorn's own grace period outlasts the engine's drain (ServerState.begin_shutdown), so that
    # requests still running at the deadline end with an error response, not a cut connection
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            root_path=root_path, lifespan="on", timeout_graceful_shutdown=shutdown_timeout + 5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.begin_shutdown()
            super().handle_exit(sig, frame)

    server = Server(config)
    failure: list[BaseException] = []

    def load_model():
        try:
            # a long run of generation: the CPU backends compile the decode step (built once per
            # machine), which serves 1.3-1.9x the tokens eager does (docs/performance.md)
            if model_process and not _is_head(choice):
                options = choice.load_options("generate")
                model = load_in_process(choice.model, choice.revision, choice.backend, options, engine_nice)
            else:
                model = choice.load("generate")
            state.attach(model)
            click.echo(f"toolbox serve: {state.name} loaded on {model.backend}; ready", err=True)
        except BaseException as exc:  # noqa: BLE001 - reported after the server stops
            failure.append(exc)
            state.failed(exc)
            server.should_exit = True

    threading.Thread(target=load_model, name="toolbox-load", daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with this
    # handler in place SIGTERM ends in a normal return (exit 0) instead of death by signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failure:
        exc = failure[0]
        raise ToolboxError(f"cannot serve: {exc}")
