"""Core plugin: registers the series' variants and the embedded model."""

from toolbox.hookspecs import hookimpl
from toolbox.registry import builtin_models


@hookimpl
def register_models():
    return builtin_models()
