"""Declaring a saga: the event that starts it, and its steps with their compensations."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from tidings.commands import Command
from tidings.errors import InvalidArgument
from tidings.events import Event

__all__ = ["Saga", "Step"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,60}$")

EventTypes = type[Event] | tuple[type[Event], ...]


def _types(value: EventTypes | Sequence[type[Event]], what: str) -> tuple[type[Event], ...]:
    items = (value,) if isinstance(value, type) else tuple(value)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, Event)):
            raise InvalidArgument(f"{what} must be Event classes, got {item!r}")
    return items


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a saga: send ``command(data)`` to the service ``to``, then wait for a reply.

    A reply of a ``success`` type completes the step (``on_success(data, reply)`` may return
    updates merged into the saga's data); a reply of a ``failure`` type, or ``timeout`` seconds
    without a reply, fails it and starts the compensation of the steps done before, in reverse
    order. ``compensation(data)`` is the command that undoes this step; if ``compensated_by``
    names reply types the saga waits for one of them (up to ``timeout``) before it compensates
    the previous step, otherwise it goes on at once.
    """

    name: str
    to: str
    command: Callable[[Mapping[str, Any]], Command]
    success: EventTypes
    failure: EventTypes = ()
    compensation: Callable[[Mapping[str, Any]], Command] | None = None
    compensated_by: EventTypes = ()
    timeout: float | None = None
    on_success: Callable[[Mapping[str, Any], Event], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidArgument(f"step name must be an identifier, got {self.name!r}")
        if not isinstance(self.to, str) or not self.to:
            raise InvalidArgument(f"step {self.name!r}: 'to' must name the owner service")
        if not callable(self.command):
            raise InvalidArgument(f"step {self.name!r}: 'command' must be a callable returning a Command")
        object.__setattr__(self, "success", _types(self.success, f"step {self.name!r} success"))
        object.__setattr__(self, "failure", _types(self.failure, f"step {self.name!r} failure"))
        object.__setattr__(
            self, "compensated_by", _types(self.compensated_by, f"step {self.name!r} compensated_by")
        )
        if not self.success:
            raise InvalidArgument(f"step {self.name!r} needs at least one success reply type")
        if self.timeout is not None and (
            not isinstance(self.timeout, int | float) or isinstance(self.timeout, bool) or self.timeout <= 0
        ):
            raise InvalidArgument(f"step {self.name!r}: timeout must be > 0 seconds, got {self.timeout!r}")

    @property
    def success_types(self) -> tuple[type[Event], ...]:
        return self.success  # type: ignore[return-value]

    @property
    def failure_types(self) -> tuple[type[Event], ...]:
        return self.failure  # type: ignore[return-value]

    @property
    def compensated_types(self) -> tuple[type[Event], ...]:
        return self.compensated_by  # type: ignore[return-value]


class Saga:
    """Base class of sagas (process managers). Subclass it, then ``service.add_saga(MySaga())``.

    ::

        class Checkout(Saga):
            name = "checkout"
            started_by = OrderSubmitted
            steps = (
                Step("reserve", to="inventory", command=lambda d: ReserveStock(order_id=d["order_id"]),
                     success=StockReserved, failure=OutOfStock,
                     compensation=lambda d: ReleaseStock(order_id=d["order_id"])),
                Step("pay", to="payments", command=lambda d: ChargeCard(order_id=d["order_id"]),
                     success=PaymentCaptured, failure=PaymentDeclined, timeout=30),
            )

            def start(self, event: OrderSubmitted) -> tuple[str, dict[str, Any]]:
                return event.order_id, {"order_id": event.order_id}

    ``start`` returns the saga's key (one instance per key: a second starting event with the same
    key is ignored) and its initial data. The saga's id is ``saga-<name>-<key>``; the commands it
    sends carry it in their metadata (``saga_id``), and the events their handlers emit carry it
    on, which is how replies find their saga: by an id in the message, never by guessing.
    """

    name: ClassVar[str]
    started_by: ClassVar[EventTypes]
    steps: ClassVar[Sequence[Step]]

    def __init__(self) -> None:
        name = getattr(type(self), "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(f"{type(self).__qualname__}.name must be an identifier, got {name!r}")
        self.start_types = _types(getattr(type(self), "started_by", ()), f"saga {name!r} started_by")
        if not self.start_types:
            raise InvalidArgument(f"saga {name!r} needs started_by (the event that starts it)")
        steps = tuple(getattr(type(self), "steps", ()))
        if not steps or not all(isinstance(s, Step) for s in steps):
            raise InvalidArgument(f"saga {name!r} needs a non-empty sequence of Step")
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"saga {name!r} has two steps with the same name")
        self.step_list: tuple[Step, ...] = steps

    def start(self, event: Event) -> tuple[str, Mapping[str, Any]]:
        """The saga's key and initial data for its starting event. Subclasses must define it."""
        raise NotImplementedError(f"{type(self).__qualname__} must define start(event)")

    def saga_id(self, key: str) -> str:
        """The id (and stream id) of this saga's instance for ``key``."""
        return f"saga-{self.name}-{key}"

    def step(self, name: str) -> Step:
        for step in self.step_list:
            if step.name == name:
                return step
        raise InvalidArgument(f"saga {self.name!r} has no step {name!r}")

    def reply_types(self) -> set[type[Event]]:
        """Every event type this saga reacts to besides its starting events."""
        out: set[type[Event]] = set()
        for step in self.step_list:
            out.update(step.success_types, step.failure_types, step.compensated_types)
        return out
