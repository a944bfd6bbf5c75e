"""Public test helpers: the backend contract suites and the events they use.

Third-party backends certify themselves by subclassing :class:`StoreContract` (see its docstring).
Importing this package requires pytest.
"""

from tidings.testing.bus import BusContract as BusContract
from tidings.testing.contract import StoreContract, collect
from tidings.testing.events import Credited, Debited, Noted, Opaque

__all__ = ["Credited", "Debited", "Noted", "Opaque", "StoreContract", "collect"]
