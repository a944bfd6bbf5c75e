"""The web console: an HTTP API and server-rendered pages over a store (``tidings serve``).

Install with ``pip install 'tidings[web]'`` (FastAPI, Jinja2, uvicorn). Importing this package
without them raises :class:`~tidings.MissingExtra` naming that command.

:func:`create_app` builds the ASGI application; :mod:`tidings.cli.serve` runs it with uvicorn.
The API is read-only unless a bearer token is configured: then ``POST`` actions (retry or discard
a dead letter, rebuild a projection) need ``Authorization: Bearer TOKEN``.
"""

from tidings.errors import MissingExtra

try:
    import fastapi  # noqa: F401
    import jinja2  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingExtra("the web console (tidings serve)", "web", exc) from exc

from tidings.web.app import Console, create_app

__all__ = ["Console", "create_app"]
