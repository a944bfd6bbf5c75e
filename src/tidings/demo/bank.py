"""A bank account, event-sourced: the walk-through run by ``tidings demo``.

The domain is three events, one aggregate and one invariant (no overdraft). :func:`run_demo`
drives it against a real store and narrates each step with Rich:

1. open an account, deposit and withdraw, each command saved as its own append;
2. an overdraft is refused by the aggregate and nothing is written;
3. two copies loaded at the same version both save: the second gets a
   :class:`~tidings.ConcurrencyError`, reloads and retries;
4. time travel to a version and to an instant;
5. with ``snapshot_every=5`` a snapshot is written and later loads start from it;
6. the stream is read back from the store.

The walk-through needs an empty ``account-1`` stream and its printed content is deterministic
(apart from the store's path and the timestamps); its outcome is returned as a :class:`BankSummary`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tidings import (
    Aggregate,
    ConcurrencyError,
    Event,
    EventStore,
    InvalidArgument,
    Repository,
    open_store,
)

__all__ = [
    "ACCOUNT_ID",
    "Account",
    "AccountOpened",
    "BankSummary",
    "InsufficientFunds",
    "MoneyDeposited",
    "MoneyWithdrawn",
    "fresh_store_url",
    "run_demo",
]

ACCOUNT_ID = "account-1"
"""The stream the walk-through writes."""


class AccountOpened(Event):
    __event_type__ = "bank.AccountOpened"
    owner: str


class MoneyDeposited(Event):
    __event_type__ = "bank.MoneyDeposited"
    amount: int


class MoneyWithdrawn(Event):
    __event_type__ = "bank.MoneyWithdrawn"
    amount: int


class InsufficientFunds(Exception):
    """A withdrawal would overdraw the account; the aggregate recorded nothing."""

    def __init__(self, account_id: str, balance: int, amount: int) -> None:
        super().__init__(f"account {account_id!r} cannot pay {amount}: the balance is only {balance}")
        self.balance = balance
        self.amount = amount


class Account(Aggregate):
    """A bank account. Invariants: amounts are positive, the balance never goes below zero."""

    __aggregate_type__ = "bank.Account"

    owner: str = ""
    balance: int = 0

    @classmethod
    def open(cls, account_id: str, owner: str) -> Account:
        """A new account (version 1, not yet saved)."""
        account = cls(account_id)
        account.record(AccountOpened(owner=owner))
        return account

    def deposit(self, amount: int) -> None:
        """Record a deposit; raises ValueError unless ``amount`` is positive."""
        _check_positive(amount)
        self.record(MoneyDeposited(amount=amount))

    def withdraw(self, amount: int) -> None:
        """Record a withdrawal; raises :class:`InsufficientFunds` rather than overdraw."""
        _check_positive(amount)
        if amount > self.balance:
            raise InsufficientFunds(self.id, self.balance, amount)
        self.record(MoneyWithdrawn(amount=amount))

    def apply(self, event: Event) -> None:
        match event:
            case AccountOpened(owner=owner):
                self.owner = owner
            case MoneyDeposited(amount=amount):
                self.balance += amount
            case MoneyWithdrawn(amount=amount):
                self.balance -= amount


def _check_positive(amount: int) -> None:
    if amount <= 0:
        raise ValueError(f"amount must be positive, got {amount}")


@dataclasses.dataclass(frozen=True, slots=True)
class BankSummary:
    """What the walk-through did, as read back from the store at its end."""

    store_url: str
    account_id: str
    owner: str
    balance: int
    version: int
    events: int
    refused: str
    conflict: str
    snapshot_version: int
    replayed_after_snapshot: int


def fresh_store_url() -> str:
    """The URL of a new SQLite file in a new temporary directory (left behind for inspection)."""
    return f"sqlite:///{Path(tempfile.mkdtemp(prefix='tidings-demo-')) / 'bank.db'}"


async def run_demo(store_url: str, console: Console) -> BankSummary:
    """Run the walk-through in the store at ``store_url``, narrating on ``console``.

    Raises :class:`~tidings.InvalidArgument` (writing nothing) if the store already holds the
    ``account-1`` stream, and any :class:`~tidings.TidingsError` the store raises.
    """
    async with open_store(store_url) as store:
        if await store.stream_version(ACCOUNT_ID) > 0:
            raise InvalidArgument(
                f"the store {store_url} already holds stream {ACCOUNT_ID!r}; run the demo on a new store"
            )
        console.print(Text(f"Store: {store_url}", style="bold"))
        summary = await _walk_through(store, console)
        _show_summary(console, summary)
    return summary


async def _walk_through(store: EventStore, console: Console) -> BankSummary:
    repo = Repository(store, Account)

    console.rule("1. Commands record events")
    account = Account.open(ACCOUNT_ID, "Ada")
    await repo.save(account)
    account.deposit(100)
    await repo.save(account)
    account.withdraw(30)
    await repo.save(account)
    say(console, f"opened for {account.owner}, deposited 100, withdrew 30: {_state(account)}")

    console.rule("2. Invariants are checked before anything is recorded")
    try:
        account.withdraw(500)
    except InsufficientFunds as exc:
        refused = str(exc)
    say(console, f"withdraw 500 refused: {refused}")
    stored = await store.stream_version(ACCOUNT_ID)
    say(console, f"pending events: {len(account.pending_events)}, stored version: {stored}")

    console.rule("3. Optimistic concurrency")
    teller = await repo.get(ACCOUNT_ID)
    atm = await repo.get(ACCOUNT_ID)
    say(console, f"teller and ATM both load the account at version {teller.version}")
    teller.withdraw(20)
    await repo.save(teller)
    say(console, f"teller withdraws 20 and saves: {_state(teller)}")
    atm.withdraw(40)
    try:
        await repo.save(atm)
    except ConcurrencyError as exc:
        conflict = str(exc)
    say(console, f"ATM withdraws 40 and saves: [red]ConcurrencyError[/]: {escape(conflict)}", markup=True)
    atm = await repo.get(ACCOUNT_ID)
    say(console, f"ATM reloads: {_state(atm)}")
    atm.withdraw(40)
    await repo.save(atm)
    say(console, f"ATM retries the withdrawal of 40 and saves: {_state(atm)}")

    console.rule("4. Time travel")
    then = await repo.get(ACCOUNT_ID, at_version=2)
    say(console, f"as of version 2: {_state(then)}")
    (third,) = [e async for e in store.read_stream(ACCOUNT_ID, after=2, limit=1)]
    then = await repo.get(ACCOUNT_ID, at_time=third.timestamp)
    say(console, f"as of {third.timestamp.isoformat()} (when version 3 was stored): {_state(then)}")

    console.rule("5. Snapshots")
    snapshots = Repository(store, Account, snapshot_every=5)
    account = await snapshots.get(ACCOUNT_ID)
    for _ in range(5):
        account.deposit(10)
        await snapshots.save(account)
    await snapshots.flush()
    snapshot = await store.load_snapshot(ACCOUNT_ID)
    assert snapshot is not None, "saving version 10 with snapshot_every=5 writes a snapshot"
    say(
        console,
        f"five deposits of 10 reach version {account.version}; snapshot stored at version {snapshot.version}",
    )
    say(console, f"snapshot state: {snapshot.state.decode()}")
    account.withdraw(25)
    await snapshots.save(account)
    loaded = await snapshots.get(ACCOUNT_ID)
    replayed = loaded.version - snapshot.version
    full = await repo.get(ACCOUNT_ID)
    say(
        console, f"withdraw 25, then load: snapshot at version {snapshot.version} + {replayed} event replayed"
    )
    say(console, f"loaded {_state(loaded)}; full replay of {full.version} events agrees: {_state(full)}")

    console.rule(f"6. The stream {ACCOUNT_ID!r}, read from the store")
    table = Table("Position", "Version", "Type", "Data")
    count = 0
    async for recorded in store.read_stream(ACCOUNT_ID):
        count += 1
        event = recorded.event
        data = event.model_dump_json() if isinstance(event, Event) else orjson.dumps(event.data).decode()
        table.add_row(str(recorded.position), str(recorded.version), recorded.event_type, Text(data))
    console.print(table)
    return BankSummary(
        store_url=store.url,
        account_id=ACCOUNT_ID,
        owner=loaded.owner,
        balance=loaded.balance,
        version=loaded.version,
        events=count,
        refused=refused,
        conflict=conflict,
        snapshot_version=snapshot.version,
        replayed_after_snapshot=replayed,
    )


def say(console: Console, message: str, *, markup: bool = False) -> None:
    """Print one narration line (plain text unless ``markup``)."""
    console.print(message if markup else Text(message), highlight=False, soft_wrap=True)


def _state(account: Account) -> str:
    return f"version {account.version}, balance {account.balance}"


def _show_summary(console: Console, summary: BankSummary) -> None:
    lines = [
        f"account {summary.account_id!r} of {summary.owner}",
        f"final balance {summary.balance} at version {summary.version}",
        f"events in the stream: {summary.events}",
        f"overdraft refused: {summary.refused}",
        f"conflict shown: {summary.conflict}",
        f"snapshot at version {summary.snapshot_version}, "
        f"{summary.replayed_after_snapshot} event replayed on top of it",
    ]
    console.print(Panel(Text("\n".join(lines)), title="Summary", expand=False))
    if urlsplit(summary.store_url).scheme != "memory":
        console.print(
            Text(f"Inspect it: tidings events {summary.account_id} --store {summary.store_url}"),
            soft_wrap=True,
        )
