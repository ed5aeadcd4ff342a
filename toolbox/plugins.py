"""The plugin manager: the core plugins plus the `toolbox` entry-point group.

The core plugins (the registry's built-in models and the built-in backends) are always
on and come first. `TOOLBOX_PLUGINS` (comma-separated entry-point names) restricts which
installed third-party plugins load; an empty value loads none of them.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from importlib.metadata import entry_points

import pluggy

from toolbox import hookspecs

CORE_PLUGINS = ("toolbox.builtin_models", "toolbox.backends.cpu", "toolbox.backends.cuda", "toolbox.backends.quant")


@cache
def manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    import importlib

    pm = pluggy.PluginManager("toolbox")
    pm.add_hookspecs(hookspecs)
    for name in CORE_PLUGINS:
        pm.register(importlib.import_module(name), name)
    allowed = os.environ.get("TOOLBOX_PLUGINS")
    allow = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in entry_points(group="toolbox"):
        if (allow is None or ep.name in allow) and pm.get_plugin(ep.name) is None:
            try:
                pm.register(ep.load(), ep.name)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the whole CLI down
                print(f"toolbox: plugin {ep.name!r} failed to load and is skipped: {exc}", file=sys.stderr)
    return pm


def hook_results(hook_name: str, **kwargs) -> list:
    """Results of calling `hook_name` on every plugin, in registration order."""
    return list(reversed(getattr(manager().hook, hook_name)(**kwargs)))


def plugin_names() -> list[str]:
    return [name for name, _ in manager().list_name_plugin()]
