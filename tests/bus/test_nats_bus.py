"""NATS specifics: URL options, set-up of streams and consumers, partitions dealt over members."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.js.api import AckPolicy, StorageType

from tests import nats_servers
from tidings.bus import BusConfigError, BusUnavailable, ConsumerGroup, open_bus
from tidings.bus.memory import MemoryBus
from tidings.bus.nats import NatsBus, NatsBusConfig
from tidings.testing.bus import FAST, Recorder
from tidings.testing.events import Credited


def test_url_options() -> None:
    config = NatsBusConfig.from_url(
        "nats://h1:4222,h2:4223?partitions=16&replicas=3&lease_ttl=4&fetch_wait=0.2"
    )
    assert config.servers == ("nats://h1:4222", "nats://h2:4223")
    assert (config.partitions, config.replicas, config.lease_ttl, config.fetch_wait) == (16, 3, 4, 0.2)
    assert config.heartbeat_interval == pytest.approx(4 / 3)
    assert config.stream_name("orders") == "TIDINGS_orders"
    assert config.subject("orders", 3, "shop.OrderPlaced") == "tidings.orders.3.shop.OrderPlaced"
    assert isinstance(open_bus("nats://127.0.0.1:1?partitions=2"), NatsBus)
    assert isinstance(open_bus("memory://?partitions=2"), MemoryBus)


@pytest.mark.parametrize(
    "url",
    [
        "nats://h:1?colour=blue",
        "nats://h:1?partitions=many",
        "nats://h:1?partitions=0",
        "nats://h:1?lease_ttl=0",
        "nats://h:1?prefix=Has.Dots",
        "kafka://h:1",
        "memory://?partitions=0",
        "memory://?shards=2",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(BusConfigError):
        open_bus(url)


async def test_unreachable_server_is_unavailable() -> None:
    bus = NatsBus(NatsBusConfig(servers=(f"nats://127.0.0.1:{nats_servers.free_port()}",), request_timeout=1))
    with pytest.raises(BusUnavailable) as info:
        await bus.open()
    assert info.value.transient


async def test_setup_creates_then_checks(nats_url: str) -> None:
    config = NatsBusConfig.from_url(nats_url + "&partitions=2")
    group = ConsumerGroup("shipping", "g", {"orders": [Credited]}, FAST)
    async with NatsBus(config) as bus:
        first = await bus.setup(["orders", "billing"], [group])
        assert [(a.kind, a.action) for a in first] == [("stream", "created")] * 2 + [
            ("consumer", "created")
        ] * 2 + [("stream", "created")]
        again = await bus.setup(["orders", "billing"], [group])
        assert {a.action for a in again} == {"unchanged"}
        info = await bus.js.stream_info(config.stream_name("orders"))
        assert info.config.storage == StorageType.FILE
        assert info.config.subjects == [f"{config.prefix}.orders.>"]
        assert info.config.duplicate_window == config.duplicate_window
        consumer = await bus.js.consumer_info(config.stream_name("orders"), config.consumer_name(group, 1))
        assert (
            consumer.config.max_ack_pending == group.delivery.max_batch
            and consumer.config.ack_policy == AckPolicy.EXPLICIT
        )
        assert consumer.config.filter_subject == f"{config.prefix}.orders.1.tidings.testing.Credited"
        # Another filter for the same group updates its consumers in place.
        wider = ConsumerGroup("shipping", "g", {"orders": []}, FAST)
        assert {a.action for a in await bus.setup([], [wider]) if a.kind == "consumer"} == {"updated"}
    other = NatsBusConfig.from_url(nats_url + "&partitions=3")
    async with NatsBus(other) as bus:
        with pytest.raises(BusConfigError, match="2 partitions"):
            await bus.setup(["orders"])


async def test_members_share_the_partitions_and_hand_over_when_one_leaves(nats_url: str) -> None:
    config = NatsBusConfig.from_url(nats_url + "&partitions=8&lease_ttl=2&heartbeat=0.3&fetch_wait=0.3")
    group = ConsumerGroup("shipping", "g", {"orders": []}, FAST)
    recorder = Recorder()
    async with NatsBus(config) as one, NatsBus(config) as two:
        first = await one.consume(group, recorder.handle, recorder.dead_letter)
        assert len(first.statistics().partitions) == 8
        second = await two.consume(group, recorder.handle, recorder.dead_letter)

        async def until(condition: object, what: str) -> None:
            deadline = time.monotonic() + 20
            while not condition():  # type: ignore[operator]
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.05)  # polling the members' statistics is what this test checks

        await until(
            lambda: len(first.statistics().partitions) == len(second.statistics().partitions) == 4,
            "the partitions dealt 4 and 4",
        )
        assert set(first.statistics().partitions).isdisjoint(second.statistics().partitions)
        left_at = time.monotonic()
        await second.stop()
        await until(lambda: len(first.statistics().partitions) == 8, "all 8 back with the remaining member")
        # A clean leave releases the leases at once: taken back within a couple of heartbeats.
        assert time.monotonic() - left_at < config.lease_ttl
