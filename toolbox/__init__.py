"""toolbox: command-line tools for rinna's Japanese GPT-NeoX 3.6B model family."""

__version__ = "0.1.0"
