"""Where the server listens: the checks `toolbox serve` and its Ray form make before they start."""

from __future__ import annotations

import ipaddress

from toolbox.errors import ToolboxError


def check_port(host: str, port: int) -> None:
    """A one-line error now for an address that cannot be bound (in use, not ours), not uvicorn's later."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ToolboxError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ToolboxError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
