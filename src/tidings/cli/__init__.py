"""The ``tidings`` command: a thin Typer app over the library.

Each command parses its options, calls the async library through ``asyncio.run`` and renders the
result: Rich tables for people, JSON lines (``--json``) for scripts. Any
:class:`~tidings.TidingsError` ends the command with one red line on stderr and exit code 1.
"""

from tidings.cli.main import app, main

__all__ = ["app", "main"]
