"""Loading the service a command runs or operates: ``APP`` as ``module:attribute``.

The module is imported with the current directory on ``sys.path``, as ``uvicorn`` and
``faststream`` do; the attribute is a :class:`~tidings.Service` or a function returning one.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from types import ModuleType
from typing import Annotated, Any

import typer

from tidings.cli.runtime import DEFAULT_STORE, fail
from tidings.errors import InvalidArgument
from tidings.service import Service

__all__ = ["AppArgument", "AppOption", "cli_service", "load_service"]

AppArgument = Annotated[
    str,
    typer.Argument(
        metavar="APP", show_default=False, help="The service, as module:attribute (e.g. shop.app:service)."
    ),
]
AppOption = Annotated[
    str,
    typer.Option(
        "--app",
        metavar="APP",
        show_default=False,
        help="The service that owns the group, as module:attribute.",
    ),
]


def load_service(spec: str, store: str | None = None) -> Service:
    """Import ``module:attribute`` and return the :class:`Service` it names.

    The attribute may be a :class:`Service` or a function returning one (a factory). Raises
    :class:`InvalidArgument` naming what is wrong: no colon, no such module, the module failed
    to import, no such attribute, the factory failed, or what was found is not a service (with
    its type). ``store`` replaces the service's store URL.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute or ":" in attribute:
        raise InvalidArgument(f"expected APP as module:attribute (e.g. shop.app:service), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _import(module_name)
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InvalidArgument(f"module {module_name!r} has no attribute {attribute!r}") from None
    if inspect.isfunction(target) or inspect.ismethod(target):
        try:
            target = target()
        except Exception as exc:
            raise InvalidArgument(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(target, Service):
            raise InvalidArgument(f"{spec}() returned {_describe(target)}; expected a tidings.Service")
    if not isinstance(target, Service):
        raise InvalidArgument(
            f"{spec} is {_describe(target)}; expected a tidings.Service instance "
            "(or a function returning one)"
        )
    if store is not None:
        target.use_store(store)
    elif target.store_url is None:
        # The library never invents a database; the command line's documented default does.
        target.use_store(DEFAULT_STORE)
    return target


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise InvalidArgument(
                f"no module named {module_name!r} (looked in the current directory and sys.path)"
            ) from None
        raise InvalidArgument(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise InvalidArgument(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc


def _describe(value: object) -> str:
    if inspect.isclass(value):
        return f"the class {value.__module__}.{value.__qualname__}"
    if inspect.ismodule(value):
        return f"the module {value.__name__}"
    return f"a {type(value).__module__}.{type(value).__qualname__}"


def cli_service(spec: str, store: str | None) -> Service:
    """:func:`load_service` for a command: a bad ``APP`` ends it with exit code 2."""
    try:
        return load_service(spec, store)
    except InvalidArgument as exc:
        fail(str(exc).replace("\n", " "), code=2)
