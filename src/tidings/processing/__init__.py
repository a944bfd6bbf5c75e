"""Reacting to events: subscriptions, handlers, projections, retries, dead letters, inboxes."""

from tidings.processing.context import HandlerContext
from tidings.processing.handlers import EventHandler
from tidings.processing.handling import HandlerSubscription
from tidings.processing.inbox import SQLiteInbox
from tidings.processing.projections import (
    Projection,
    ProjectionStatus,
    ProjectionSubscription,
    ProjectionTx,
    fold,
    projection_status,
    rebuild_projection,
)
from tidings.processing.retry import RetryPolicy
from tidings.processing.subscription import (
    Subscription,
    SubscriptionConfig,
    SubscriptionStats,
)

__all__ = [
    "EventHandler",
    "HandlerContext",
    "HandlerSubscription",
    "Projection",
    "ProjectionStatus",
    "ProjectionSubscription",
    "ProjectionTx",
    "RetryPolicy",
    "SQLiteInbox",
    "Subscription",
    "SubscriptionConfig",
    "SubscriptionStats",
    "fold",
    "projection_status",
    "rebuild_projection",
]
