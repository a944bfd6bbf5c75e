"""tidings: typed events, an event store, event sourcing, subscriptions and projections.

The names below are the public API; everything else is implementation. Quick tour::

    from tidings import Aggregate, Event, Repository, open_store

    class Deposited(Event):
        amount: int

    async with open_store("sqlite:///bank.db") as store:
        await store.append("account-1", [Deposited(amount=10)])
"""

from tidings.aggregate import Aggregate
from tidings.bus import Bus, open_bus
from tidings.causal import CausalTrace, DeadLetterInfo, TraceNode, TraceNotFound, build_trace
from tidings.commands import Command
from tidings.errors import (
    AggregateNotFound,
    AlreadyProcessed,
    CheckpointConflict,
    ConcurrencyError,
    CorruptEvent,
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
from tidings.integration import IntegrationEvent
from tidings.metrics import MetricsConfig, MetricsError, ServiceMetrics
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
from tidings.sagas import ManualClock, Saga, Step
from tidings.service import Service
from tidings.store import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendRequest,
    AppendResult,
    DeadLetter,
    EventStore,
    ExpectedVersion,
    ProcessedBatch,
    Snapshot,
    SQLStore,
    StoredEvent,
    StoreFactory,
    StreamInfo,
    TrackingStore,
    Tx,
    open_store,
    register_store,
    require,
    store_schemes,
)
from tidings.store.append import StreamState
from tidings.store.deadletters import DeadLetterNotFound
from tidings.store.tracking import DeadLetterRecord, ProjectionGeneration
from tidings.tracing import TraceParent

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Aggregate",
    "AggregateNotFound",
    "AlreadyProcessed",
    "AppendRequest",
    "AppendResult",
    "Bus",
    "CausalTrace",
    "CheckpointConflict",
    "Command",
    "ConcurrencyError",
    "CorruptEvent",
    "CorruptStore",
    "DeadLetter",
    "DeadLetterInfo",
    "DeadLetterNotFound",
    "DeadLetterRecord",
    "DuplicateEventId",
    "DuplicateEventType",
    "Event",
    "EventHandler",
    "EventRegistry",
    "EventStore",
    "EventTypeError",
    "ExpectedVersion",
    "GroupStatus",
    "HandlerContext",
    "IntegrationEvent",
    "IntegrityError",
    "InvalidArgument",
    "InvalidStreamId",
    "ManualClock",
    "MetricsConfig",
    "MetricsError",
    "MissingExtra",
    "ProcessedBatch",
    "Projection",
    "ProjectionError",
    "ProjectionGeneration",
    "ProjectionTx",
    "RawEvent",
    "RecordedEvent",
    "Repository",
    "RetryPolicy",
    "SQLStore",
    "SQLiteInbox",
    "Saga",
    "SerializationError",
    "Service",
    "ServiceMetrics",
    "Snapshot",
    "SnapshotError",
    "StatementError",
    "Step",
    "StoreClosed",
    "StoreError",
    "StoreFactory",
    "StoreUnavailable",
    "StoredEvent",
    "StreamInfo",
    "StreamState",
    "SubscriptionConfig",
    "SubscriptionStats",
    "TidingsError",
    "TraceNode",
    "TraceNotFound",
    "TraceParent",
    "TrackingStore",
    "Tx",
    "UnknownEventType",
    "UnsupportedOperation",
    "UpcastError",
    "__version__",
    "build_trace",
    "default_registry",
    "fold",
    "group_status",
    "open_bus",
    "open_store",
    "rebuild_projection",
    "register_store",
    "require",
    "store_schemes",
    "upcaster",
]
