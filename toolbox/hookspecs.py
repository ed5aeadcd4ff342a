"""The hooks a toolbox plugin can implement (entry-point group `toolbox`)."""

import pluggy

hookspec = pluggy.HookspecMarker("toolbox")
hookimpl = pluggy.HookimplMarker("toolbox")


@hookspec
def register_models():
    """Return a list of `toolbox.registry.ModelSpec` to add to the model registry."""


@hookspec
def register_backends():
    """Return a list of backends (see `toolbox.backend.Backend`) this plugin provides."""


@hookspec
def register_commands(cli):
    """Add click commands to the `toolbox` command group `cli`."""
