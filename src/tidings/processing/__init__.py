"""Reacting to events: subscriptions, handlers, projections, retries, dead letters, inboxes."""

from tidings.processing.context import HandlerContext
from tidings.processing.handlers import EventHandler
from tidings.processing.handling import HandlerSubscription
from tidings.processing.inbox import SQLiteInbox
from tidings.processing.leases import Lease, LeaseHolder, LeaseRecord, read_leases
from tidings.processing.projections import (
    Projection,
    ProjectionStale,
    ProjectionStatus,
    ProjectionSubscription,
    ProjectionTx,
    fold,
    projection_status,
    rebuild_projection,
)
from tidings.processing.retry import RetryPolicy
from tidings.processing.status import GroupState, GroupStatus, group_status
from tidings.processing.subscription import (
    RunnerBlocked,
    Subscription,
    SubscriptionConfig,
    SubscriptionStats,
)

__all__ = [
    "EventHandler",
    "GroupState",
    "GroupStatus",
    "HandlerContext",
    "HandlerSubscription",
    "Lease",
    "LeaseHolder",
    "LeaseRecord",
    "Projection",
    "ProjectionStale",
    "ProjectionStatus",
    "ProjectionSubscription",
    "ProjectionTx",
    "RetryPolicy",
    "RunnerBlocked",
    "SQLiteInbox",
    "Subscription",
    "SubscriptionConfig",
    "SubscriptionStats",
    "fold",
    "group_status",
    "projection_status",
    "read_leases",
    "rebuild_projection",
]
