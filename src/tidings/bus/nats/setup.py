"""Creating and checking what the bus needs on the JetStream server.

* one **stream per publishing service**: ``<PREFIX>_<service>`` over ``<prefix>.<service>.>``,
  file storage, ``replicas`` copies, limits retention (``max_age``, ``max_bytes``, old messages
  discarded first), a de-duplication window for ``Nats-Msg-Id``, and its partition count in the
  stream's metadata (``tidings_partitions``) so every publisher and consumer agrees on it;
* one **durable pull consumer per (consumer group, partition)** of each source stream: explicit
  acks, ``max_ack_pending`` = the group's ``max_batch`` (one batch in flight, handled in order:
  per-aggregate order, see :mod:`tidings.bus.nats.consumer`), unlimited deliveries
  (the client counts attempts and dead-letters, so a poison message is acked, never stuck),
  ``ack_wait`` from the group's :class:`~tidings.bus.base.DeliveryPolicy`;
* one **lease stream** ``<PREFIX>_LEASES`` with per-message TTLs, one message kept per subject,
  holding partition leases and member heartbeats (see :mod:`tidings.bus.nats.consumer`).

Existing streams are updated in place where JetStream allows it (replicas, limits, subjects);
a stream with another partition count or storage type raises :class:`BusConfigError`, since
re-partitioning a live stream would break per-aggregate order.
"""

from __future__ import annotations

from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ReplayPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from tidings.bus.base import ConsumerGroup, SetupAction, check_name
from tidings.bus.errors import BusConfigError
from tidings.bus.nats.config import NatsBusConfig

__all__ = ["ensure_consumer", "ensure_lease_stream", "ensure_stream", "setup", "setup_stream"]

PARTITIONS_KEY = "tidings_partitions"


def stream_config(config: NatsBusConfig, service: str) -> StreamConfig:
    return StreamConfig(
        name=config.stream_name(service),
        description=f"tidings integration events published by {service}",
        subjects=[f"{config.prefix}.{service}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=config.replicas,
        max_age=config.max_age,
        max_bytes=config.max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=config.duplicate_window,
        metadata={PARTITIONS_KEY: str(config.partitions), "tidings_service": service},
    )


async def ensure_stream(js: JetStreamContext, config: NatsBusConfig, service: str) -> int:
    """Create or check the stream of publishing ``service``; return its partition count."""
    partitions, _ = await setup_stream(js, config, service)
    return partitions


async def setup_stream(js: JetStreamContext, config: NatsBusConfig, service: str) -> tuple[int, SetupAction]:
    """Create or check the stream of publishing ``service``: its partition count and what was done."""
    desired = stream_config(config, service)
    name = config.stream_name(service)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(desired)
        detail = f"{config.partitions} partitions, {config.replicas} replica(s), file storage"
        return config.partitions, SetupAction("stream", name, "created", detail)
    current = info.config
    partitions = int((current.metadata or {}).get(PARTITIONS_KEY, "0"))
    if partitions != config.partitions:
        raise BusConfigError(
            f"stream {name} has {partitions} partitions, the bus is configured with {config.partitions}: "
            "partitions cannot change on a live stream (drain it and delete it first)"
        )
    if current.storage != StorageType.FILE:
        raise BusConfigError(f"stream {name} does not use file storage; delete it to let tidings create it")
    differs = (
        current.num_replicas != desired.num_replicas
        or (current.max_age or 0) != (desired.max_age or 0)
        or (current.max_bytes or -1) != desired.max_bytes
        or current.duplicate_window != desired.duplicate_window
        or sorted(current.subjects or []) != sorted(desired.subjects or [])
    )
    if differs:
        await js.update_stream(desired)
    detail = f"{partitions} partitions, {desired.num_replicas} replica(s), file storage"
    return partitions, SetupAction("stream", name, "updated" if differs else "unchanged", detail)


async def ensure_consumer(
    js: JetStreamContext, config: NatsBusConfig, group: ConsumerGroup, source: str, partition: int
) -> SetupAction:
    """Create, or update to the current filters and ack wait, the durable consumer of ``group`` on
    one partition of ``source``'s stream; its name is the action's ``name``."""
    name = config.consumer_name(group, partition)
    types = group.sources[source]
    filters = (
        [config.subject(source, partition, t) for t in sorted(types)]
        if types
        else [config.partition_filter(source, partition)]
    )
    consumer = ConsumerConfig(
        durable_name=name,
        description=f"tidings consumer group {group.label}, partition {partition} of {source}",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=group.delivery.ack_wait,
        max_deliver=-1,
        max_ack_pending=group.delivery.max_batch,
        replay_policy=ReplayPolicy.INSTANT,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
        metadata={"tidings_group": group.label, "tidings_source": source},
    )
    stream = config.stream_name(source)
    try:
        current = (await js.consumer_info(stream, name)).config
    except NotFoundError:
        await js.add_consumer(stream, consumer)
        return SetupAction("consumer", name, "created", f"on {stream}: {', '.join(filters)}")
    same = (
        sorted(current.filter_subjects or ([current.filter_subject] if current.filter_subject else []))
        == filters
        and current.ack_wait == consumer.ack_wait
        and current.max_ack_pending == consumer.max_ack_pending
        and current.ack_policy == AckPolicy.EXPLICIT
    )
    if same:
        return SetupAction("consumer", name, "unchanged", f"on {stream}")
    if current.ack_policy != AckPolicy.EXPLICIT:
        raise BusConfigError(
            f"consumer {name} on {stream} exists without explicit acks, which per-aggregate order "
            "needs; delete it to let tidings create it"
        )
    await js.add_consumer(stream, consumer)
    return SetupAction("consumer", name, "updated", f"on {stream}: {', '.join(filters)}")


async def ensure_lease_stream(js: JetStreamContext, config: NatsBusConfig) -> SetupAction:
    """Create the stream of leases and member heartbeats if missing."""
    name = config.lease_stream
    try:
        await js.stream_info(name)
        return SetupAction("stream", name, "unchanged", "leases and member heartbeats")
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=name,
                description="tidings consumer group leases and member heartbeats",
                subjects=[f"{config.prefix}_leases.>"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=config.replicas,
                max_msgs_per_subject=1,
                allow_msg_ttl=True,
                discard=DiscardPolicy.OLD,
            )
        )
        return SetupAction("stream", name, "created", "leases and member heartbeats")


async def setup(
    js: JetStreamContext, config: NatsBusConfig, publishing: Iterable[str], groups: Iterable[ConsumerGroup]
) -> list[SetupAction]:
    """Create or check the streams of ``publishing`` services and of every group's sources, the
    groups' consumers, and the lease stream; what ``tidings bus setup`` and service start-up run."""
    actions: list[SetupAction] = []
    partitions: dict[str, int] = {}
    groups = list(groups)
    services = [check_name("service", s) for s in publishing] + [
        src for g in groups for src in sorted(g.sources)
    ]
    for service in services:
        if service not in partitions:
            partitions[service], action = await setup_stream(js, config, service)
            actions.append(action)
    for group in groups:
        for source in sorted(group.sources):
            for p in range(partitions[source]):
                actions.append(await ensure_consumer(js, config, group, source, p))
    if groups:
        actions.append(await ensure_lease_stream(js, config))
    return actions
