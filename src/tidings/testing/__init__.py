"""Public test helpers: the backend contract suites and the events they use.

Third-party backends certify themselves by subclassing :class:`StoreContract` (see its docstring),
and :class:`TrackingContract` / :class:`SQLContract` for each further capability they implement.
Importing this package requires pytest.
"""

from tidings.testing.bus import BusContract as BusContract
from tidings.testing.contract import StoreContract, collect
from tidings.testing.events import Credited, Debited, Noted, Opaque
from tidings.testing.tracking import SQLContract, TrackingContract

__all__ = [
    "Credited",
    "Debited",
    "Noted",
    "Opaque",
    "SQLContract",
    "StoreContract",
    "TrackingContract",
    "collect",
]
