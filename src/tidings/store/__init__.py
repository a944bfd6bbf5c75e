"""Event stores: the capability layers and their backends, found by URL scheme.

* ``memory://`` — in process memory (tests, tooling);
* ``sqlite:///path.db`` — the embedded default, one file, zero set-up;
* ``postgresql://user@host/db`` — PostgreSQL, for many processes and machines
  (``pip install 'tidings[postgres]'``).

A backend is a factory ``(url, *, registry=None) -> EventStore`` registered for a URL scheme: by a
distribution's entry point in the ``tidings.stores`` group, or in code with :func:`register_store`.
What a backend can do is the class it implements: :class:`EventStore` < :class:`TrackingStore` <
:class:`SQLStore` (see :mod:`tidings.store.tracking`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

from tidings.errors import InvalidArgument
from tidings.events import EventRegistry
from tidings.store.append import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendRequest,
    AppendResult,
    ExpectedVersion,
)
from tidings.store.base import EventStore, Snapshot, StoredEvent, StreamInfo, mask_password
from tidings.store.tracking import (
    DeadLetter,
    ProcessedBatch,
    SQLStore,
    TrackingStore,
    Tx,
    require,
)

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendRequest",
    "AppendResult",
    "DeadLetter",
    "EventStore",
    "ExpectedVersion",
    "ProcessedBatch",
    "SQLStore",
    "Snapshot",
    "StoreFactory",
    "StoredEvent",
    "StreamInfo",
    "TrackingStore",
    "Tx",
    "open_store",
    "register_store",
    "require",
    "store_schemes",
]

ENTRY_POINT_GROUP = "tidings.stores"
"""The entry-point group in which distributions register store backends (name = URL scheme)."""


class StoreFactory(Protocol):
    """What makes a store from its URL: a backend class such as ``SQLiteStore`` fits."""

    def __call__(self, url: str, *, registry: EventRegistry | None = None) -> EventStore: ...


# The built-in backends, also found without installed metadata (a source checkout on sys.path).
# Imported on first use: the PostgreSQL backend needs its extra only when it is asked for.
_BUILT_IN: Mapping[str, str] = {
    "memory": "tidings.store.memory:MemoryStore",
    "sqlite": "tidings.store.sqlite:SQLiteStore",
    "postgresql": "tidings.store.postgres:PostgresStore",
    "postgres": "tidings.store.postgres:PostgresStore",
}
_registered: dict[str, StoreFactory] = {}
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")


def register_store(scheme: str, factory: StoreFactory) -> None:
    """Make :func:`open_store` open URLs of ``scheme`` with ``factory`` (code-level plug-in).

    A registration here takes precedence over entry points and built-ins, so a test or an
    application can substitute a backend; registering a scheme again replaces its factory.
    Raises :class:`~tidings.InvalidArgument` for a malformed scheme or a factory that is not callable.
    """
    if not isinstance(scheme, str) or not _SCHEME.match(scheme):
        raise InvalidArgument(
            f"store URL scheme must be lower-case letters, digits, '+', '-' or '.', starting with a "
            f"letter; got {scheme!r}"
        )
    if not callable(factory):
        raise InvalidArgument(f"store factory for {scheme!r} must be callable, got {factory!r}")
    _registered[scheme] = factory


def store_schemes() -> list[str]:
    """Every URL scheme :func:`open_store` knows: registered, from entry points, built in."""
    return sorted({*_registered, *_entry_points(), *_BUILT_IN})


def open_store(url: str, *, registry: EventRegistry | None = None) -> EventStore:
    """Create the store for ``url``; use it as ``async with open_store(url) as store:``.

    The store connects (and creates its schema if needed) when entered or on ``await
    store.open()``. Raises :class:`~tidings.InvalidArgument` for an unknown scheme (naming the known
    ones) or a malformed URL, and :class:`~tidings.MissingExtra` when the backend's extra is not
    installed.
    """
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"store URL must be a non-empty string, got {url!r}")
    scheme = urlsplit(url).scheme
    factory = _factory(scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in store_schemes())
        raise InvalidArgument(
            f"unknown store URL scheme {scheme!r} in {mask_password(url)!r}; known: {known}"
        )
    store = factory(url, registry=registry)
    if not isinstance(store, EventStore):
        raise InvalidArgument(
            f"the store factory for {scheme!r} returned {type(store).__qualname__}, not an EventStore"
        )
    return store


def _factory(scheme: str) -> StoreFactory | None:
    found = _registered.get(scheme)
    if found is not None:
        return found
    target = _entry_points().get(scheme) or _BUILT_IN.get(scheme)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    factory: StoreFactory = getattr(importlib.import_module(module), attr)
    return factory


_entry_point_cache: dict[str, str] | None = None


def _entry_points() -> dict[str, str]:
    """Scheme -> ``module:attr`` of every installed ``tidings.stores`` entry point (read once)."""
    global _entry_point_cache
    if _entry_point_cache is None:
        _entry_point_cache = {
            ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        }
    return _entry_point_cache
