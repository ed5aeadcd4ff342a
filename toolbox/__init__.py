"""toolbox: a Python library and command-line tools for rinna's Japanese GPT-NeoX 3.6B family.

    import toolbox
    model = toolbox.load("sft")            # or a hub id, a checkpoint directory; default: embedded
    print(model.generate("日本の首都は？").text)

Importing the package is cheap: the library (`toolbox.api`) and torch load on first use.
"""

from toolbox.errors import ToolboxError

__version__ = "0.1.0"
__all__ = ["Model", "ToolboxError", "load", "tokenizer"]

_API = {"load", "tokenizer", "Model", "Completion", "Sample", "Scores", "Comparison"}


def __getattr__(name: str):
    if name in _API:
        from toolbox import api, results, scoring

        for module in (api, results, scoring):
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module 'toolbox' has no attribute {name!r}")
