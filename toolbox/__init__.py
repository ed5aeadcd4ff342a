"""toolbox: a Python library and command-line tools for rinna's Japanese GPT-NeoX 3.6B family.

    import toolbox
    model = toolbox.load("sft")            # or a hub id, a checkpoint directory; default: embedded
    print(model.generate("日本の首都は？").text)

Importing the package is cheap: the library (`toolbox.api`) and torch load on first use.
"""

# The module toolbox.tokenizer is imported first, so that the function below, not the module,
# is what `toolbox.tokenizer` names (`from toolbox.tokenizer import Tokenizer` still works).
import toolbox.tokenizer as _tokenizer_module  # noqa: F401
from toolbox.errors import ToolboxError

__version__ = "0.1.0"
__all__ = ["Model", "ToolboxError", "load", "tokenizer"]

_API = {"load", "Model", "Completion", "Sample", "Scores", "Comparison"}


def tokenizer(model: str | None = None, revision: str | None = None):
    """The model's sentencepiece tokenizer (`toolbox.tokenizer.Tokenizer`), without loading the model or torch."""
    from toolbox.api import tokenizer as load_tokenizer

    return load_tokenizer(model, revision)


def __getattr__(name: str):
    if name in _API:
        from toolbox import api, results, scoring

        for module in (api, results, scoring):
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module 'toolbox' has no attribute {name!r}")
