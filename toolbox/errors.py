"""The one exception type commands raise for user mistakes: printed as one line, exit 1."""

import click


class ToolboxError(click.ClickException):
    """A user-facing error: click prints `Error: <message>` and exits with status 1."""
