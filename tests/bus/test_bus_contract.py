"""The bus contract suite on the in-process bus and on a real NATS JetStream server."""

from __future__ import annotations

import pytest

from tidings.bus import Bus, open_bus
from tidings.bus.nats import NatsBus, NatsBusConfig
from tidings.testing.bus import BusContract


class TestMemoryBus(BusContract):
    timeout = 10.0

    async def make_bus(self) -> Bus:
        return await open_bus("memory://?partitions=4").open()


class TestNatsBus(BusContract):
    @pytest.fixture(autouse=True)
    def _url(self, nats_url: str) -> None:
        self.url = nats_url

    async def make_bus(self) -> Bus:
        config = NatsBusConfig.from_url(self.url + "&partitions=4&lease_ttl=2&fetch_wait=0.5")
        return await NatsBus(config).open()
