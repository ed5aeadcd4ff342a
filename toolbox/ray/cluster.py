"""Reaching Ray: import it (or say how to install it), connect to a cluster or start a local one.

Ray's own connect keeps retrying an address that does not answer, logging each try. So an
address is first tried with a plain TCP connection and a short timeout, and Ray's wait for
a peer that answers but is not a usable cluster (another service, a missing auth token)
is cut to the same few seconds: either way, a one-line error within seconds. A session
this process already holds (a test's, a notebook's) is used as it is.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from toolbox.errors import ToolboxError

INSTALL_HINT = "pip install 'rinna-toolbox[ray]'"
CONNECT_TIMEOUT = 5.0  # seconds for the TCP check of an address
DEFAULT_PORTS = {"ray": 10001}  # Ray Client's port when a ray:// address names none; a GCS address needs one


def require(what: str, *modules: str):
    """The `ray` module (and `modules`, e.g. "ray.serve"), or a one-line install hint naming `what`."""
    try:
        ray = importlib.import_module("ray")
        for name in modules:
            importlib.import_module(name)
    except ImportError as exc:
        missing = f" ({exc})" if exc.name not in (None, "ray") else ""
        raise ToolboxError(f"{what} needs Ray{missing}: {INSTALL_HINT}") from None
    return ray


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host[:port]` address; None for "auto" and "local"."""
    if address in ("auto", "local"):
        return None
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    elif scheme != "ray":
        raise ToolboxError(f"--ray-address {address}: expected host:port, ray://host:port, auto or local")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon:
        if scheme in DEFAULT_PORTS:
            return rest.rstrip("/"), DEFAULT_PORTS[scheme]
        raise ToolboxError(f"--ray-address {address}: expected host:port (the head node's GCS port, 6379 by default)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ToolboxError(f"--ray-address {address}: the port {port!r} is not a number in 1..65535")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A TCP connection to the address succeeds within `timeout` seconds, else a one-line error."""
    target = split_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except TimeoutError:
        raise ToolboxError(f"--ray-address {address}: no answer within {timeout:g} s (is the cluster up and "
                           "reachable from here?)") from None
    except OSError as exc:
        raise ToolboxError(f"--ray-address {address}: cannot reach a Ray cluster there "
                           f"({exc.strerror or exc})") from None


@contextmanager
def connected(address: str | None, what: str, *modules: str) -> Iterator:
    """Ray, connected for the duration: the cluster at `address` (or $RAY_ADDRESS), else a local one
    started here and shut down after. A session this process already holds is used as is."""
    ray = require(what, *modules)
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address is None:  # no dashboard for a cluster of our own: it costs seconds and processes
            ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        else:
            check_reachable(address)
            # something that accepts the connection may still not be a cluster (a proxy, another
            # service): Ray then retries for 20 s, logging each try; give it a few seconds, quietly
            with _environ("RAY_gcs_server_port_wait_time_s", str(int(CONNECT_TIMEOUT))), _stderr_muted():
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--ray-address {address}" if address else "starting a local Ray cluster"
        why = _root_cause(exc)
        raise ToolboxError(f"{where}: {first_line(exc)}{f' ({why})' if why else ''}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextmanager
def _stderr_muted() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the duration: Ray's C++ core logs each retry there, below Python."""
    import sys

    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _root_cause(exc: BaseException) -> str | None:
    """What the cluster said, from the innermost exception Ray chained (its last line, first sentence):
    an authentication token missing, a service that is not Ray, ..."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    if inner is exc:
        return None
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    if not lines:
        return None
    why = lines[-1].split(". ")[0].rstrip(".")
    why = why.split(": ", 1)[1] if why.startswith("ray.exceptions.") else why
    if "AuthToken" in why:
        why += "; for a cluster with token authentication set RAY_AUTH_MODE=token and provide its token"
    return why


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (Ray's carry tracebacks and advice)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def remote_error(exc: BaseException) -> str:
    """The line of a failure on the cluster that says what went wrong: the toolbox error raised in a
    replica or actor when there is one (Ray wraps it in its own exception and traceback), else the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "ToolboxError: " in line:
            return line.split("ToolboxError: ", 1)[1]
    return lines[-1] if lines else type(exc).__name__


def check_choice(choice) -> None:
    """The model options' checks that need neither the model nor the backend here: the workers may
    sit on machines with GPUs this one lacks."""
    from toolbox.backends import registered
    from toolbox.checkpoints import parse_model

    parse_model(choice.model, choice.revision)
    backends = registered()
    backend = backends.get(choice.backend)
    if backend is None and choice.backend != "auto":
        raise ToolboxError(f"unknown backend {choice.backend!r}; known: auto, {', '.join(backends)}")
    if backend is not None:
        backend.check_options(choice.options)


def gpus_per_worker(backend: str, device: str | None, cluster_gpus: float) -> int:
    """GPUs one replica or actor holds by default: one for a model on CUDA (the cuda backend, a cuda
    device, or auto on a cluster with GPUs, where auto picks cuda), else none."""
    if backend == "cuda" or (device or "").startswith("cuda"):
        return 1
    return 1 if backend == "auto" and cluster_gpus > 0 else 0


def portable(choice):
    """`choice` with a local model directory made absolute: workers do not share our working directory."""
    from dataclasses import replace

    if choice.model and os.path.isdir(os.path.expanduser(choice.model)):
        return replace(choice, model=os.path.abspath(os.path.expanduser(choice.model)))
    return choice
