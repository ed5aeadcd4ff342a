"""The `toolbox` command tree.

Commands are imported only when they run (or when help lists them), so that the
tokenizer commands and `--help` start fast and never import torch or transformers.
Plugins add commands through the `register_commands` hook.
"""

from __future__ import annotations

import importlib

import click

from toolbox import __version__

COMMANDS = {
    "tokenize": "toolbox.commands.tokenize:tokenize",
    "detokenize": "toolbox.commands.detokenize:detokenize",
    "inspect-bytes": "toolbox.commands.inspect_bytes:inspect_bytes",
    "models": "toolbox.commands.models:models",
    "download": "toolbox.commands.models:download",
    "backends": "toolbox.commands.backends:backends",
    "generate": "toolbox.commands.generate:generate",
    "chat": "toolbox.commands.chat:chat",
    "score": "toolbox.commands.score:score",
    "serve": "toolbox.commands.serve:serve",
    "eval": "toolbox.commands.eval:eval_group",
    "finetune": "toolbox.commands.finetune:finetune",
    "classify": "toolbox.commands.heads:classify",
    "tag": "toolbox.commands.heads:tag",
}


class LazyGroup(click.Group):
    """A group whose built-in commands are imported on demand; plugin commands are added on first miss."""

    plugin_commands = True  # False: show the built-in commands only (docs/cli.md)
    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if self.plugin_commands and not self._plugins_loaded:
            self._plugins_loaded = True
            from toolbox.plugins import hook_results

            hook_results("register_commands", cli=self)

    def list_commands(self, ctx):
        self._load_plugin_commands()
        return sorted({*COMMANDS, *self.commands})

    def invoke(self, ctx):
        """Run the command; a `ToolboxError` from anywhere below becomes click's one-line `Error:`, exit 1."""
        from toolbox.errors import ToolboxError

        try:
            return super().invoke(ctx)
        except ToolboxError as exc:
            raise click.ClickException(str(exc)) from None

    def get_command(self, ctx, name):
        if name in COMMANDS:
            module, attr = COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        self._load_plugin_commands()
        return self.commands.get(name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="toolbox")
def cli():
    """Tools for rinna's Japanese GPT-NeoX 3.6B models: tokenize, inspect, generate, score, serve.

    Every model command takes --model (env TOOLBOX_MODEL): a registry id or alias
    (see `toolbox models list`), a hub id, or a local checkpoint directory. The
    default is the small embedded model, so everything works offline.
    """


def main() -> None:
    """Console-script entry point (click turns a closed stdout pipe into a quiet exit)."""
    cli.main(prog_name="toolbox")
