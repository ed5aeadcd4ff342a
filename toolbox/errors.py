"""The one exception type for user mistakes (bad input, unknown model, unusable settings).

A plain `Exception`, so the library, runtime and backends never depend on click; the CLI
turns it into its one-line `Error: <message>` and exit status 1 at the edge (toolbox.cli).
"""


class ToolboxError(Exception):
    """A user-facing error: `str(exc)` is one line that says what was wrong and where."""
