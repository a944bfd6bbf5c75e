"""Sagas: steps, compensations in reverse order, durable deadlines under a manual clock, and
exactly-once steps under duplicates and replays; on every SQL backend (sagas need one)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tidings import (
    Command,
    Event,
    EventStore,
    HandlerContext,
    InvalidArgument,
    ManualClock,
    RetryPolicy,
    Saga,
    Service,
    Step,
    SubscriptionConfig,
    open_store,
)
from tidings.sagas import list_sagas, saga_history, saga_state

pytestmark = pytest.mark.needs("sql")

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.02, retry=RetryPolicy(max_attempts=2, initial_delay=0.001, max_delay=0.01)
)


class OrderSubmitted(Event):
    __event_type__ = "tests.saga.OrderSubmitted"
    order_id: str
    amount: int
    quantity: int


class ReserveStock(Command):
    __event_type__ = "tests.saga.ReserveStock"
    order_id: str
    quantity: int


class ReleaseStock(Command):
    __event_type__ = "tests.saga.ReleaseStock"
    order_id: str
    quantity: int


class StockReserved(Event):
    __event_type__ = "tests.saga.StockReserved"
    order_id: str


class OutOfStock(Event):
    __event_type__ = "tests.saga.OutOfStock"
    order_id: str


class StockReleased(Event):
    __event_type__ = "tests.saga.StockReleased"
    order_id: str


class AuthorizePayment(Command):
    __event_type__ = "tests.saga.AuthorizePayment"
    order_id: str
    amount: int


class VoidPayment(Command):
    __event_type__ = "tests.saga.VoidPayment"
    order_id: str


class PaymentAuthorized(Event):
    __event_type__ = "tests.saga.PaymentAuthorized"
    order_id: str
    authorization: str


class PaymentDeclined(Event):
    __event_type__ = "tests.saga.PaymentDeclined"
    order_id: str


class ShipOrder(Command):
    __event_type__ = "tests.saga.ShipOrder"
    order_id: str
    authorization: str


class OrderShipped(Event):
    __event_type__ = "tests.saga.OrderShipped"
    order_id: str


def remember_authorization(data: Mapping[str, Any], reply: Event) -> Mapping[str, Any]:
    assert isinstance(reply, PaymentAuthorized)
    return {"authorization": reply.authorization}


class Checkout(Saga):
    name = "checkout"
    started_by = OrderSubmitted
    steps = (
        Step(
            "reserve",
            to="inventory",
            command=lambda d: ReserveStock(order_id=d["order_id"], quantity=d["quantity"]),
            success=StockReserved,
            failure=OutOfStock,
            compensation=lambda d: ReleaseStock(order_id=d["order_id"], quantity=d["quantity"]),
            compensated_by=StockReleased,
            timeout=60,
        ),
        Step(
            "authorize",
            to="payments",
            command=lambda d: AuthorizePayment(order_id=d["order_id"], amount=d["amount"]),
            success=PaymentAuthorized,
            failure=PaymentDeclined,
            compensation=lambda d: VoidPayment(order_id=d["order_id"]),
            timeout=5,
            on_success=remember_authorization,
        ),
        Step(
            "ship",
            to="shipping",
            command=lambda d: ShipOrder(order_id=d["order_id"], authorization=d["authorization"]),
            success=OrderShipped,
        ),
    )

    def start(self, event: Event) -> tuple[str, Mapping[str, Any]]:
        assert isinstance(event, OrderSubmitted)
        return event.order_id, {
            "order_id": event.order_id,
            "amount": event.amount,
            "quantity": event.quantity,
        }


class World:
    """The saga's service and the three services it talks to, on one store."""

    def __init__(self, store: EventStore, clock: ManualClock, *, release_replies: bool = True) -> None:
        self.store = store
        self.stock = 10
        self.calls: Counter[str] = Counter()
        self.orders = Service("orders", store, config=FAST)
        self.orders.add_saga(Checkout(), clock=clock)
        self.inventory = Service("inventory", store, config=FAST)
        self.payments = Service("payments", store, config=FAST)
        self.shipping = Service("shipping", store, config=FAST)

        @self.inventory.handles_command(ReserveStock)
        async def reserve(command: ReserveStock, ctx: HandlerContext) -> None:
            self.calls["reserve"] += 1
            if command.quantity > self.stock:
                ctx.emit(f"stock-{command.order_id}", [OutOfStock(order_id=command.order_id)])
                return
            self.stock -= command.quantity
            ctx.emit(f"stock-{command.order_id}", [StockReserved(order_id=command.order_id)])

        @self.inventory.handles_command(ReleaseStock)
        async def release(command: ReleaseStock, ctx: HandlerContext) -> None:
            self.calls["release"] += 1
            if release_replies:
                self.stock += command.quantity
                ctx.emit(f"stock-{command.order_id}", [StockReleased(order_id=command.order_id)])

        @self.payments.handles_command(AuthorizePayment)
        async def authorize(command: AuthorizePayment, ctx: HandlerContext) -> None:
            self.calls["authorize"] += 1
            if command.amount == 999:
                return  # the provider is too slow: no answer before the deadline
            if command.amount > 100:
                ctx.emit(f"pay-{command.order_id}", [PaymentDeclined(order_id=command.order_id)])
            else:
                ctx.emit(
                    f"pay-{command.order_id}",
                    [PaymentAuthorized(order_id=command.order_id, authorization=f"auth-{command.order_id}")],
                )

        @self.payments.handles_command(VoidPayment)
        async def void(command: VoidPayment) -> None:
            self.calls["void"] += 1

        @self.shipping.handles_command(ShipOrder)
        async def ship(command: ShipOrder, ctx: HandlerContext) -> None:
            self.calls["ship"] += 1
            assert command.authorization == f"auth-{command.order_id}"
            ctx.emit(f"ship-{command.order_id}", [OrderShipped(order_id=command.order_id)])

    def services(self) -> list[Service]:
        return [self.orders, self.inventory, self.payments, self.shipping]

    async def submit(self, order_id: str, amount: int, quantity: int = 1) -> None:
        await self.store.append(
            f"order-{order_id}", [OrderSubmitted(order_id=order_id, amount=amount, quantity=quantity)]
        )

    async def settle(self, saga_id: str, *states: str) -> str:
        """Wait until the saga reaches one of ``states`` (driven by the running services)."""
        for _ in range(300):
            state = (await saga_state(self.store, saga_id)).status
            if state in states:
                return state
            await self.store.wait_for_append(await self.store.head(), timeout=0.05)
        raise AssertionError(f"saga {saga_id} stuck in {state!r}")


class Running:
    def __init__(self, world: World) -> None:
        self.world = world
        self.stack: list[Any] = []

    async def __aenter__(self) -> World:
        for service in self.world.services():
            cm = service.running()
            await cm.__aenter__()
            self.stack.append(cm)
        return self.world

    async def __aexit__(self, *exc: object) -> None:
        for cm in reversed(self.stack):
            await cm.__aexit__(None, None, None)


async def test_happy_path_completes_with_data_from_replies(store: EventStore) -> None:
    world = World(store, ManualClock())
    async with Running(world):
        await world.submit("1", amount=50, quantity=2)
        assert await world.settle("saga-checkout-1", "completed") == "completed"
    state = await saga_state(store, "saga-checkout-1")
    assert state.data["authorization"] == "auth-1" and state.done == ["reserve", "authorize", "ship"]
    assert world.calls == {"reserve": 1, "authorize": 1, "ship": 1}
    history = [e.event_type.rsplit(".", 1)[-1] for e in await saga_history(store, "saga-checkout-1")]
    assert history == [
        "SagaStarted",
        "StepStarted",
        "StepSucceeded",
        "StepStarted",
        "StepSucceeded",
        "StepStarted",
        "StepSucceeded",
        "SagaCompleted",
    ]
    [summary] = await list_sagas(store, status="completed")
    assert summary.saga_id == "saga-checkout-1" and summary.step is None and summary.due_at is None


async def test_a_declined_payment_releases_the_stock(store: EventStore) -> None:
    world = World(store, ManualClock())
    async with Running(world):
        await world.submit("2", amount=500, quantity=3)
        assert await world.settle("saga-checkout-2", "compensated", "failed") == "compensated"
    state = await saga_state(store, "saga-checkout-2")
    assert state.reason == "authorize: PaymentDeclined" and state.done == []
    assert world.stock == 10  # the reservation was released: nothing leaked
    assert world.calls == {"reserve": 1, "authorize": 1, "release": 1}  # no void: never authorized


async def test_out_of_stock_at_the_first_step_has_nothing_to_compensate(store: EventStore) -> None:
    world = World(store, ManualClock())
    async with Running(world):
        await world.submit("3", amount=10, quantity=50)
        assert await world.settle("saga-checkout-3", "compensated") == "compensated"
    assert world.calls == {"reserve": 1}


async def test_a_slow_payment_trips_the_deadline_and_both_steps_are_compensated_in_reverse(
    store: EventStore,
) -> None:
    clock = ManualClock()
    world = World(store, clock)
    async with Running(world):
        await world.submit("4", amount=999, quantity=1)
        for _ in range(2000):
            if (await saga_state(store, "saga-checkout-4")).step == "authorize":
                break
            await store.wait_for_append(await store.head(), timeout=0.05)
        assert world.calls["void"] == 0
        await clock.advance(4.9)  # not yet
        assert (await saga_state(store, "saga-checkout-4")).status == "running"
        await clock.advance(0.2)
        assert await world.settle("saga-checkout-4", "compensated", "failed") == "compensated"
    history = [e.event for e in await saga_history(store, "saga-checkout-4")]
    kinds = [type(e).__name__ for e in history]
    # The timed-out payment is voided first (it may have gone through), then the stock released.
    started = [e.step for e in history if type(e).__name__ == "CompensationStarted"]  # type: ignore[attr-defined]
    assert started == ["authorize", "reserve"]
    assert kinds[-1] == "SagaCompensated"
    assert world.calls["void"] == 1 and world.calls["release"] == 1 and world.stock == 10


async def test_deadlines_survive_a_restart(store: EventStore) -> None:
    """The deadline is stored: a new process (new services, same store) fires it."""
    clock = ManualClock()
    first = World(store, clock)
    async with Running(first):
        await first.submit("5", amount=999)
        for _ in range(2000):
            if (await saga_state(store, "saga-checkout-5")).step == "authorize":
                break
            await store.wait_for_append(await store.head(), timeout=0.05)
    # Everything stopped while the saga waits for the payment. Time passes; a new process starts.
    await clock.advance(60)
    second = World(store, clock)
    async with Running(second):
        assert await second.settle("saga-checkout-5", "compensated", "failed") == "compensated"
    assert second.calls["void"] == 1 and second.calls["release"] == 1


async def test_a_compensation_that_never_answers_fails_the_saga_with_the_reason(store: EventStore) -> None:
    clock = ManualClock()
    world = World(store, clock, release_replies=False)
    async with Running(world):
        await world.submit("6", amount=500)
        for _ in range(2000):
            if (await saga_state(store, "saga-checkout-6")).status == "compensating":
                break
            await store.wait_for_append(await store.head(), timeout=0.05)
        await clock.advance(61)
        assert await world.settle("saga-checkout-6", "failed", "compensated") == "failed"
    state = await saga_state(store, "saga-checkout-6")
    assert state.reason == "compensation of reserve timed out"
    assert [s.saga_id for s in await list_sagas(store, status="failed")] == ["saga-checkout-6"]


async def test_duplicates_and_replays_never_run_a_step_twice(store: EventStore) -> None:
    world = World(store, ManualClock())
    async with Running(world):
        await world.submit("7", amount=50)
        await world.submit("7", amount=50)  # the same order submitted twice
        assert await world.settle("saga-checkout-7", "completed") == "completed"
    versions = len(await saga_history(store, "saga-checkout-7"))
    # Replay every group of every service from the start of the log.
    for group in list(await store.checkpoints()):
        await store.set_checkpoint(group, 0)
    async with Running(world):
        for service in world.services():
            assert await service.wait_for(await store.head(), timeout=30)
    assert len(await saga_history(store, "saga-checkout-7")) == versions
    commands = Counter(
        [e.event_type async for e in store.read_all(event_types=[ReserveStock, AuthorizePayment, ShipOrder])]
    )
    assert set(commands.values()) == {1}, commands
    replies = Counter([e.event_type async for e in store.read_all(event_types=[StockReserved, OrderShipped])])
    assert set(replies.values()) == {1}, replies


def test_saga_declarations_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        Step(
            "bad name!",
            to="x",
            command=lambda d: ReleaseStock(order_id="1", quantity=1),
            success=StockReleased,
        )
    with pytest.raises(InvalidArgument):
        Step("s", to="x", command=lambda d: ReleaseStock(order_id="1", quantity=1), success=())
    with pytest.raises(InvalidArgument):
        Step(
            "s",
            to="x",
            command=lambda d: ReleaseStock(order_id="1", quantity=1),
            success=StockReleased,
            timeout=0,
        )

    class NoSteps(Saga):
        name = "none"
        started_by = OrderSubmitted
        steps = ()

    with pytest.raises(InvalidArgument):
        NoSteps()
    service = Service("s", "memory://")
    with pytest.raises(InvalidArgument):
        service.add_saga("checkout")  # type: ignore[arg-type]

    @service.handles_command(ReserveStock)
    async def one(command: ReserveStock) -> None: ...

    with pytest.raises(InvalidArgument, match="one owner"):

        @service.handles_command(ReserveStock)
        async def two(command: ReserveStock) -> None: ...


async def test_sagas_need_a_sql_store() -> None:
    service = Service("s", "memory://", config=FAST)
    service.add_saga(Checkout(), clock=ManualClock())
    with pytest.raises(Exception, match="need a SQL database"):
        async with service.running():
            pass


def test_cli_lists_and_shows_sagas(tmp_path: Path) -> None:
    import asyncio

    import orjson
    from typer.testing import CliRunner

    from tidings.cli.main import app

    url = f"sqlite:///{tmp_path}/cli.db"

    async def scenario() -> None:
        async with open_store(url) as store:
            world = World(store, ManualClock())
            async with Running(world):
                await world.submit("ok", amount=10)
                await world.submit("no", amount=500)
                await world.settle("saga-checkout-ok", "completed")
                await world.settle("saga-checkout-no", "compensated")

    asyncio.run(scenario())
    runner = CliRunner()
    listed = runner.invoke(app, ["sagas", "list", "--state", "compensated", "--json", "--store", url])
    assert listed.exit_code == 0, listed.output
    [line] = listed.output.splitlines()
    assert orjson.loads(line)["saga_id"] == "saga-checkout-no"
    shown = runner.invoke(app, ["sagas", "show", "saga-checkout-no", "--store", url])
    assert shown.exit_code == 0, shown.output
    assert "compensated" in shown.output and "CompensationStarted" in shown.output
    assert "authorize: PaymentDeclined" in shown.output
    missing = runner.invoke(app, ["sagas", "show", "saga-checkout-nope", "--store", url])
    assert missing.exit_code == 1 and "no saga" in missing.output
    bad = runner.invoke(app, ["sagas", "list", "--state", "bogus", "--store", url])
    assert bad.exit_code == 2


class ShipmentPlanned(Event):
    """Emitted by Shipping's handler of the checkout's ShipOrder command: it carries that saga's id."""

    __event_type__ = "tests.saga.ShipmentPlanned"
    order_id: str


class PrintLabel(Command):
    __event_type__ = "tests.saga.PrintLabel"
    order_id: str


class LabelPrinted(Event):
    __event_type__ = "tests.saga.LabelPrinted"
    order_id: str


class Labels(Saga):
    """A second saga, started by an event that answered the first saga's command."""

    name = "checkout-labels"  # shares the prefix 'saga-checkout-' with Checkout's instances
    started_by = ShipmentPlanned
    steps = (
        Step(
            "print",
            to="labels",
            command=lambda d: PrintLabel(order_id=d["order_id"]),
            success=LabelPrinted,
        ),
    )

    def start(self, event: Event) -> tuple[str, Mapping[str, Any]]:
        assert isinstance(event, ShipmentPlanned)
        return event.order_id, {"order_id": event.order_id}


async def test_a_saga_started_by_another_sagas_reply_starts_and_ids_sharing_a_prefix_stay_apart(
    store: EventStore,
) -> None:
    world = World(store, ManualClock())

    @world.shipping.handles(ShipOrder, group="shipping.plan")
    async def plan(command: ShipOrder, ctx: HandlerContext) -> None:
        ctx.emit(f"plan-{command.order_id}", [ShipmentPlanned(order_id=command.order_id)])

    world.orders.add_saga(Labels(), clock=ManualClock())
    labels = Service("labels", store, config=FAST)

    @labels.handles_command(PrintLabel)
    async def print_label(command: PrintLabel, ctx: HandlerContext) -> None:
        ctx.emit(f"label-{command.order_id}", [LabelPrinted(order_id=command.order_id)])

    async with Running(world), labels.running():
        await world.submit("8", amount=10)
        assert await world.settle("saga-checkout-8", "completed") == "completed"
        assert await world.settle("saga-checkout-labels-8", "completed") == "completed"
    # Checkout ('saga-checkout-') never touched the Labels instance ('saga-checkout-labels-8').
    checkout = await saga_state(store, "saga-checkout-8")
    labels_state = await saga_state(store, "saga-checkout-labels-8")
    assert checkout.saga == "checkout" and labels_state.saga == "checkout-labels"
    kinds = [type(e.event).__name__ for e in await saga_history(store, "saga-checkout-labels-8")]
    assert kinds == ["SagaStarted", "StepStarted", "StepSucceeded", "SagaCompleted"]


async def test_a_failing_start_hook_ends_run_instead_of_hanging(store: EventStore) -> None:
    service = Service("orders", store, config=FAST)
    service.add_saga(Checkout(), clock=ManualClock())

    @service.on_start
    async def broken() -> None:
        raise RuntimeError("start hook failed")

    with pytest.raises(RuntimeError, match="start hook failed"):
        await asyncio.wait_for(service.run(), 30)  # the saga timer stops with the rest
