"""Event classes used by the contract suites (their type names are namespaced to avoid clashes)."""

from __future__ import annotations

from typing import Any

from tidings.events import Event

__all__ = ["Credited", "Debited", "Noted", "Opaque"]


class Credited(Event):
    """A test event with an amount."""

    __event_type__ = "tidings.testing.Credited"
    amount: int


class Debited(Event):
    """A second test event type, for filters."""

    __event_type__ = "tidings.testing.Debited"
    amount: int


class Noted(Event):
    """A test event with free text (unicode, escaping)."""

    __event_type__ = "tidings.testing.Noted"
    text: str


class Opaque(Event):
    """A test event that can hold anything, including values that are not serialisable."""

    __event_type__ = "tidings.testing.Opaque"
    payload: Any
