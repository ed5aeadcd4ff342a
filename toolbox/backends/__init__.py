"""The built-in backends (`cpu`, `cuda`, `quant`, core plugins that are always on) and
backend selection over everything registered, plugins included.

Each built-in lives in a module of its own that registers it through the same
`register_backends` hook a third-party plugin implements.
"""

from __future__ import annotations

from toolbox.backend import Backend
from toolbox.errors import ToolboxError

AUTO_ORDER = ("cuda", "cpu")


def registered() -> dict[str, Backend]:
    """Every registered backend by name: the built-ins first, then plugins in load order."""
    from toolbox.plugins import hook_results

    found: dict[str, Backend] = {}
    for group in hook_results("register_backends"):
        for backend in group or ():
            found.setdefault(backend.name, backend)
    return found


def pick(name: str = "auto") -> Backend:
    """The backend called `name`; "auto" means cuda when it is available, else cpu."""
    backends = registered()
    if not backends:
        raise ToolboxError("no backends are loaded (check the installed plugins)")
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = backends.get(candidate)
            if backend is not None and backend.unavailable_reason() is None:
                return backend
        name = "cpu"
    backend = backends.get(name)
    usable = [n for n, b in backends.items() if b.unavailable_reason() is None]
    if backend is None:
        raise ToolboxError(f"unknown backend {name!r}; available: {', '.join(usable) or 'none'}")
    reason = backend.unavailable_reason()
    if reason is not None:
        raise ToolboxError(f"backend {name!r} is not available ({reason}); available: {', '.join(usable) or 'none'}")
    return backend
