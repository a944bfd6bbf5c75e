"""tidings: typed events, an event store, event sourcing, subscriptions and projections.

The names below are the public API; everything else is implementation. Quick tour::

    from tidings import Aggregate, Event, Repository, open_store

    class Deposited(Event):
        amount: int

    async with open_store("sqlite:///bank.db") as store:
        await store.append("account-1", [Deposited(amount=10)])
"""

from tidings.aggregate import Aggregate
from tidings.errors import (
    AggregateNotFound,
    CheckpointConflict,
    ConcurrencyError,
    CorruptStore,
    DuplicateEventId,
    DuplicateEventType,
    EventTypeError,
    IntegrityError,
    InvalidArgument,
    InvalidStreamId,
    MissingExtra,
    ProjectionError,
    SerializationError,
    SnapshotError,
    StatementError,
    StoreClosed,
    StoreError,
    StoreUnavailable,
    TidingsError,
    UnknownEventType,
    UnsupportedOperation,
    UpcastError,
)
from tidings.events import Event, EventRegistry, RawEvent, RecordedEvent, default_registry, upcaster
from tidings.processing import (
    EventHandler,
    GroupStatus,
    HandlerContext,
    Projection,
    ProjectionTx,
    RetryPolicy,
    SQLiteInbox,
    SubscriptionConfig,
    SubscriptionStats,
    fold,
    group_status,
    rebuild_projection,
)
from tidings.repository import Repository
from tidings.service import Service
from tidings.store import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    EventStore,
    Snapshot,
    StreamInfo,
    open_store,
)

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Aggregate",
    "AggregateNotFound",
    "AppendResult",
    "CheckpointConflict",
    "ConcurrencyError",
    "CorruptStore",
    "DuplicateEventId",
    "DuplicateEventType",
    "Event",
    "EventHandler",
    "EventRegistry",
    "EventStore",
    "EventTypeError",
    "GroupStatus",
    "HandlerContext",
    "IntegrityError",
    "InvalidArgument",
    "InvalidStreamId",
    "MissingExtra",
    "Projection",
    "ProjectionError",
    "ProjectionTx",
    "RawEvent",
    "RecordedEvent",
    "Repository",
    "RetryPolicy",
    "SQLiteInbox",
    "SerializationError",
    "Service",
    "Snapshot",
    "SnapshotError",
    "StatementError",
    "StoreClosed",
    "StoreError",
    "StoreUnavailable",
    "StreamInfo",
    "SubscriptionConfig",
    "SubscriptionStats",
    "TidingsError",
    "UnknownEventType",
    "UnsupportedOperation",
    "UpcastError",
    "__version__",
    "default_registry",
    "fold",
    "group_status",
    "open_store",
    "rebuild_projection",
    "upcaster",
]
