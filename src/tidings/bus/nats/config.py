"""Settings of the NATS JetStream bus: one small, frozen object, also readable from a URL."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from urllib.parse import parse_qsl, urlsplit

from tidings.bus.base import ConsumerGroup
from tidings.bus.errors import BusConfigError

__all__ = ["NatsBusConfig"]

_PREFIX = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclasses.dataclass(frozen=True, slots=True)
class NatsBusConfig:
    """How the bus uses JetStream.

    ``servers``: seed URLs of the cluster. ``prefix``: first subject token and stream name prefix.
    ``partitions``: partitions of a publishing service's stream (fixed when the stream is created).
    ``replicas``: JetStream replicas of streams, consumers and leases (1 or 3 in a 3-node cluster).
    ``max_age`` (seconds, 0 = forever), ``max_bytes`` (-1 = unlimited): retention of a stream.
    ``duplicate_window``: seconds in which a re-published event id is dropped by the stream.
    ``lease_ttl``: whole seconds a partition lease lives without renewal (failover bound, see
    :mod:`tidings.bus.nats`); ``heartbeat``: seconds between renewals (default ``lease_ttl / 3``).
    ``fetch_wait``: seconds a pull waits for a message (also how soon a stopping member notices).
    ``request_timeout``: seconds to wait for a publish acknowledgement or an API answer.
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    prefix: str = "tidings"
    partitions: int = 8
    replicas: int = 1
    max_age: float = 7 * 24 * 3600.0
    max_bytes: int = -1
    duplicate_window: float = 120.0
    lease_ttl: int = 6
    heartbeat: float | None = None
    fetch_wait: float = 1.0
    request_timeout: float = 5.0
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.servers:
            raise BusConfigError("at least one NATS server URL is needed")
        if not _PREFIX.fullmatch(self.prefix):
            raise BusConfigError(f"prefix {self.prefix!r} must be lower-case letters, digits, '_' or '-'")
        if not 1 <= self.partitions <= 1024:
            raise BusConfigError(f"partitions must be 1..1024, got {self.partitions}")
        if self.replicas not in (1, 2, 3, 4, 5):
            raise BusConfigError(f"replicas must be 1..5, got {self.replicas}")
        if not isinstance(self.lease_ttl, int) or self.lease_ttl < 1:
            # JetStream message TTLs have a resolution of whole seconds.
            raise BusConfigError(f"lease_ttl must be a whole number of seconds >= 1, got {self.lease_ttl}")
        if self.heartbeat is not None and not 0 < self.heartbeat < self.lease_ttl:
            raise BusConfigError("heartbeat must be > 0 and shorter than lease_ttl")
        if self.fetch_wait <= 0 or self.request_timeout <= 0 or self.duplicate_window <= 0:
            raise BusConfigError("fetch_wait, request_timeout and duplicate_window must be > 0")

    @classmethod
    def from_url(cls, url: str) -> NatsBusConfig:
        """``nats://h1:4222,h2:4222?partitions=8&replicas=3&lease_ttl=6&prefix=tidings&...``.

        Options are the field names; unknown options raise :class:`BusConfigError`.
        """
        parts = urlsplit(url)
        hosts = [h for h in parts.netloc.split(",") if h]
        if not hosts:
            raise BusConfigError(f"no NATS server in {url!r}")
        options = dict(parse_qsl(parts.query))
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, object] = {"servers": tuple(f"{parts.scheme}://{h}" for h in hosts)}
        for key, text in options.items():
            if key not in kinds or key == "servers":
                raise BusConfigError(f"unknown NATS bus option {key!r} in {url!r}")
            kind = str(kinds[key])
            try:
                if kind == "int":
                    values[key] = int(text)
                elif "float" in kind:
                    values[key] = float(text)
                else:
                    values[key] = text
            except ValueError as exc:
                raise BusConfigError(f"option {key}={text!r} is not a number") from exc
        return cls(**values)  # type: ignore[arg-type]

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat if self.heartbeat is not None else self.lease_ttl / 3

    # -- naming ------------------------------------------------------------------------------------

    def stream_name(self, service: str) -> str:
        """The stream of a publishing service: ``<PREFIX>_<service>``."""
        return f"{self.prefix.upper()}_{service}"

    def subject(self, service: str, partition: int, event_type: str) -> str:
        """``<prefix>.<service>.<partition>.<event type>`` (the type may span several tokens)."""
        return f"{self.prefix}.{service}.{partition}.{event_type}"

    def partition_filter(self, service: str, partition: int) -> str:
        return f"{self.prefix}.{service}.{partition}.>"

    def consumer_name(self, group: ConsumerGroup, partition: int) -> str:
        """The durable consumer of ``group`` on one partition of a source stream.

        ``<service>_<group>_<hash>_p<n>``: the hash keeps names that read alike (``a_b``/``c`` and
        ``a``/``b_c``) apart.
        """
        return f"{self.group_id(group)}_p{partition}"

    def group_id(self, group: ConsumerGroup) -> str:
        digest = hashlib.blake2b(f"{group.service}\0{group.name}".encode(), digest_size=4).hexdigest()
        return f"{group.service}_{group.name}_{digest}"

    @property
    def lease_stream(self) -> str:
        """The stream holding partition leases and member heartbeats of every group."""
        return f"{self.prefix.upper()}_LEASES"

    def lease_subject(self, group: ConsumerGroup, source: str, partition: int) -> str:
        return f"{self.prefix}_leases.{self.group_id(group)}.lease.{source}.{partition}"

    def member_subject(self, group: ConsumerGroup, member: str) -> str:
        return f"{self.prefix}_leases.{self.group_id(group)}.member.{member}"

    def members_filter(self, group: ConsumerGroup) -> str:
        return f"{self.prefix}_leases.{self.group_id(group)}.member.*"
