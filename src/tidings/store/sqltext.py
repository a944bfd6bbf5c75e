"""Splitting SQL scripts into statements, for DDL given as one string (projection tables).

A semicolon ends a statement only at the top level: not inside a string literal, a quoted
identifier, a comment, a PostgreSQL dollar-quoted body or a SQLite trigger's ``BEGIN ... END``.
Splitting on every ``;`` broke DDL such as ``CREATE TABLE t (a TEXT DEFAULT 'x;y')``.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Final

from tidings.errors import InvalidArgument

__all__ = ["split_statements"]

_DIALECTS: Final = ("sqlite", "postgresql")


def split_statements(sql: str, dialect: str = "sqlite") -> list[str]:
    """The statements of the script ``sql``, in order, each without its final ``;``.

    ``dialect`` is ``"sqlite"`` (string literals, quoted identifiers in ``"``, `````, ``[]``,
    comments, ``CREATE TRIGGER ... BEGIN ...; END``, as :func:`sqlite3.complete_statement` reads
    them) or ``"postgresql"`` (string literals including ``E'...'`` with backslash escapes, quoted
    identifiers, ``$tag$ ... $tag$`` bodies, ``--`` and nested ``/* */`` comments). Statements
    that hold nothing but whitespace and comments are dropped; other comments stay with the
    statement that follows them. An unterminated last statement is returned as it is, for the
    database to judge.

    Raises :class:`~tidings.InvalidArgument` if ``sql`` is not a str or the dialect is unknown.
    """
    if not isinstance(sql, str):
        raise InvalidArgument(f"SQL must be a str, got {type(sql).__qualname__}")
    if dialect == "sqlite":
        return _split_sqlite(sql)
    if dialect in ("postgresql", "postgres"):
        return _split_postgres(sql)
    raise InvalidArgument(f"unknown SQL dialect {dialect!r}; expected one of {', '.join(_DIALECTS)}")


def _split_sqlite(sql: str) -> list[str]:
    # Grow a candidate piece by piece between semicolons until SQLite's own tokenizer says it is
    # a complete statement: that semicolon is the one that ends it.
    out: list[str] = []
    pending = ""
    for piece in sql.split(";"):
        pending += piece
        if sqlite3.complete_statement(pending + ";"):
            _keep(out, pending)
            pending = ""
        else:
            pending += ";"
    # The loop added a ";" after the last piece, which the script did not have.
    _keep(out, pending[:-1] if pending.endswith(";") else pending)
    return out


_DOLLAR_TAG: Final = re.compile(r"\$(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")
_WORD_CHAR: Final = re.compile(r"[A-Za-z0-9_$\x80-\uffff]")


def _split_postgres(sql: str) -> list[str]:
    out: list[str] = []
    start = 0
    i = 0
    n = len(sql)
    while i < n:
        c = sql[i]
        if c == ";":
            _keep(out, sql[start:i])
            start = i + 1
            i += 1
        elif c == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not _WORD_CHAR.match(sql[i - 2]))
            i = _end_of_quoted(sql, i, "'", backslash=escapes)
        elif c == '"':
            i = _end_of_quoted(sql, i, '"', backslash=False)
        elif c == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif c == "/" and sql.startswith("/*", i):
            i = _end_of_block_comment(sql, i)
        elif c == "$" and (i == 0 or not _WORD_CHAR.match(sql[i - 1])):
            match = _DOLLAR_TAG.match(sql, i)
            if match is None:  # $1, a positional parameter
                i += 1
            else:
                end = sql.find(match.group(), match.end())
                i = n if end < 0 else end + len(match.group())
        else:
            i += 1
    _keep(out, sql[start:])
    return out


def _end_of_quoted(sql: str, i: int, quote: str, *, backslash: bool) -> int:
    """The index just past the literal opened by ``sql[i]`` (a doubled quote stays inside)."""
    i += 1
    n = len(sql)
    while i < n:
        c = sql[i]
        if backslash and c == "\\":
            i += 2
        elif c == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n


def _end_of_block_comment(sql: str, i: int) -> int:
    """The index just past the ``/* ... */`` comment opened at ``i``; PostgreSQL nests them."""
    depth = 0
    n = len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _keep(out: list[str], statement: str) -> None:
    statement = statement.strip()
    if not _only_comments(statement):
        out.append(statement)


def _only_comments(text: str) -> bool:
    """True if ``text`` holds nothing but whitespace and comments (no statement to run)."""
    i = 0
    n = len(text)
    while i < n:
        if text[i].isspace():
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            i = _end_of_block_comment(text, i)
        else:
            return False
    return True
