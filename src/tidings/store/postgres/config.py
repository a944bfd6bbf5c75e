"""The PostgreSQL backend's options, read from its URL (see :mod:`tidings.store.postgres`)."""

from __future__ import annotations

import dataclasses
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg.conninfo

from tidings.errors import InvalidArgument
from tidings.store.base import mask_password
from tidings.store.postgres.schema import quote_schema

__all__ = ["PostgresConfig", "redact"]

_OPTIONS: Final = frozenset({"schema", "migrate", "poll_interval", "pool_size", "pool_timeout"})


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresConfig:
    """Options of the PostgreSQL backend, read from the URL (see the module docstring).

    ``conninfo`` is the URL without tidings' own options, as handed to libpq.
    """

    conninfo: str
    schema: str = "public"
    migrate: bool = True
    poll_interval: float = 0.5
    pool_size: int = 10
    pool_timeout: float = 30.0

    @classmethod
    def from_url(cls, url: str) -> PostgresConfig:
        """Parse ``url``; raise :class:`InvalidArgument` for a malformed URL or option."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise InvalidArgument(f"not a PostgreSQL URL: {redact(url)!r}")
        ours: dict[str, str] = {}
        libpq: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _OPTIONS:
                ours[key] = value
            else:
                libpq.append((key, value))
        if not any(key == "application_name" for key, _ in libpq):
            libpq.append(("application_name", "tidings"))
        conninfo = urlunsplit(parts._replace(query=urlencode(libpq)))
        try:
            psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            raise InvalidArgument(f"{redact(url)!r} is not a valid PostgreSQL URL: {exc}") from exc
        schema = ours.get("schema", "public")
        quote_schema(schema)
        migrate_option = ours.get("migrate", "true").lower()
        if migrate_option not in ("true", "false", "1", "0", "yes", "no"):
            raise InvalidArgument(f"{redact(url)!r}: migrate must be true or false, not {migrate_option!r}")
        return cls(
            conninfo=conninfo,
            schema=schema,
            migrate=migrate_option in ("true", "1", "yes"),
            poll_interval=_positive(url, ours, "poll_interval", 0.5),
            pool_size=int(_positive(url, ours, "pool_size", 10, integer=True)),
            pool_timeout=_positive(url, ours, "pool_timeout", 30.0),
        )


def _positive(
    url: str, options: dict[str, str], name: str, default: float, *, integer: bool = False
) -> float:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = -1
    if not value > 0:
        kind = "a positive integer" if integer else "a positive number of seconds"
        raise InvalidArgument(f"{redact(url)!r}: {name} must be {kind}, not {raw!r}")
    return value


def redact(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` option) masked, for messages."""
    return mask_password(url)
