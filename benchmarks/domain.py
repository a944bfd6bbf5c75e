"""The tidings side of the benchmark domain: an account opened once, then credited.

:mod:`benchmarks.peer_eventsourcing` defines the same model with the peer's idioms. Both sides store
an opening event carrying the owner and deposit events carrying an amount and a reference, so the
bytes written and decoded are of the same order on both sides.
"""

from __future__ import annotations

from tidings import Aggregate, Event


class AccountOpened(Event):
    __event_type__ = "bench.AccountOpened"

    owner: str


class Deposited(Event):
    __event_type__ = "bench.Deposited"

    amount: int
    reference: str


class Account(Aggregate):
    __aggregate_type__ = "bench.Account"

    owner: str = ""
    balance: int = 0

    def open(self, owner: str) -> None:
        self.record(AccountOpened(owner=owner))

    def deposit(self, amount: int, reference: str) -> None:
        self.record(Deposited(amount=amount, reference=reference))

    def apply(self, event: Event) -> None:
        match event:
            case AccountOpened(owner=owner):
                self.owner = owner
            case Deposited(amount=amount):
                self.balance += amount


def new_account(account_id: str, n_events: int) -> Account:
    """An unsaved account holding ``n_events`` pending events: one opening, then deposits."""
    account = Account(account_id)
    account.open(owner=f"owner of {account_id}")
    for i in range(1, n_events):
        account.deposit(amount=i, reference=f"ref-{i:08d}")
    return account


def deposits(n: int) -> list[Event]:
    """``n`` events for a bulk append: an opening followed by deposits."""
    events: list[Event] = [AccountOpened(owner="bulk owner")]
    events.extend(Deposited(amount=i, reference=f"ref-{i:08d}") for i in range(1, n))
    return events
