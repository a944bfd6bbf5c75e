"""The PostgreSQL backend's options, read from its URL (see :mod:`tidings.store.postgres`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
import psycopg.conninfo

from tidings.errors import InvalidArgument
from tidings.store.postgres.schema import quote_schema

__all__ = ["PostgresConfig", "redact"]

_OPTIONS: Final = frozenset({"schema", "migrate", "poll_interval", "pool_size", "pool_timeout"})

_SECRETS: Final = frozenset({"password", "sslpassword"})

CONNECT_TIMEOUT: Final = 10
"""Seconds libpq waits for a connection (``connect_timeout``) unless the URL or
``PGCONNECT_TIMEOUT`` says otherwise: without it, a server that accepts but never answers would
hold an open (or a reconnect) for the operating system's TCP timeout, minutes."""


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
        for key, value in _parse_query(parts.query):
            if key in _OPTIONS:
                ours[key] = value
            else:
                libpq.append((key, value))
        given = {key for key, _ in libpq}
        if "application_name" not in given:
            libpq.append(("application_name", "tidings"))
        if "connect_timeout" not in given and not os.environ.get("PGCONNECT_TIMEOUT"):
            libpq.append(("connect_timeout", str(CONNECT_TIMEOUT)))
        conninfo = urlunsplit(parts._replace(query=_build_query(libpq)))
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
    """``url`` with its password (in the authority, or a ``password=`` / ``sslpassword=`` option)
    masked, for messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = _build_query([(k, "***" if k in _SECRETS else v) for k, v in _parse_query(parts.query)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _parse_query(query: str) -> list[tuple[str, str]]:
    """A URL's query as libpq reads it: ``%XX`` is decoded and ``+`` is a plus sign, not a space
    (``urllib.parse.parse_qsl`` would turn ``options=-c+x`` into ``-c x``)."""
    pairs = []
    for item in query.split("&"):
        if item:
            key, _, value = item.partition("=")
            pairs.append((unquote(key), unquote(value)))
    return pairs


def _build_query(pairs: list[tuple[str, str]], safe: str = "") -> str:
    """The inverse of :func:`_parse_query`: spaces become ``%20`` (``urlencode`` would write ``+``,
    which libpq keeps as a plus sign: ``application_name=billing worker`` would arrive as
    ``billing+worker`` and ``options=-c statement_timeout=1000`` would not parse at all)."""
    return "&".join(f"{quote(key, safe=safe)}={quote(value, safe=safe)}" for key, value in pairs)
