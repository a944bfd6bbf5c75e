"""split_statements: a semicolon ends a statement only at the top level of the script."""

from __future__ import annotations

import sqlite3

import pytest

from tidings import InvalidArgument
from tidings.store.sqltext import split_statements

BOTH = ["sqlite", "postgresql"]


@pytest.mark.parametrize("dialect", BOTH)
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("", []),
        ("  ;\n; ", []),
        ("SELECT 1", ["SELECT 1"]),
        ("SELECT 1;", ["SELECT 1"]),
        ("SELECT 1; SELECT 2;\n", ["SELECT 1", "SELECT 2"]),
        (
            "CREATE TABLE {t} (a TEXT DEFAULT 'x;y'); CREATE INDEX {t}_a ON {t} (a)",
            ["CREATE TABLE {t} (a TEXT DEFAULT 'x;y')", "CREATE INDEX {t}_a ON {t} (a)"],
        ),
        (
            "CREATE TABLE t (a TEXT CHECK (a <> ';'), b TEXT DEFAULT 'it''s; fine');SELECT 2",
            ["CREATE TABLE t (a TEXT CHECK (a <> ';'), b TEXT DEFAULT 'it''s; fine')", "SELECT 2"],
        ),
        ('CREATE TABLE "odd;name" (a INT); SELECT 1', ['CREATE TABLE "odd;name" (a INT)', "SELECT 1"]),
        (
            "SELECT 1 -- a comment; with a semicolon\n; SELECT 2",
            ["SELECT 1 -- a comment; with a semicolon", "SELECT 2"],
        ),
        ("SELECT /* a; b */ 1; SELECT 2", ["SELECT /* a; b */ 1", "SELECT 2"]),
        ("SELECT 1; -- trailing comment only", ["SELECT 1"]),
        ("SELECT 1; /* just a comment; */", ["SELECT 1"]),
        ("SELECT 'unterminated; string", ["SELECT 'unterminated; string"]),
    ],
)
def test_split_statements(dialect: str, script: str, expected: list[str]) -> None:
    assert split_statements(script, dialect) == expected


def test_sqlite_trigger_body_stays_whole() -> None:
    script = (
        "CREATE TABLE t (a TEXT);\n"
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN\n"
        "  UPDATE t SET a = 'x;' WHERE rowid = new.rowid;\n"
        "  DELETE FROM t WHERE a = ';';\n"
        "END;\n"
        "INSERT INTO t VALUES ('a')"
    )
    statements = split_statements(script, "sqlite")
    assert (
        len(statements) == 3 and statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END")
    )
    conn = sqlite3.connect(":memory:")
    for statement in statements:
        conn.execute(statement)
    assert conn.execute("SELECT a FROM t").fetchall() == [("x;",)]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (
            "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql; SELECT f()",
            ["CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql", "SELECT f()"],
        ),
        (
            "DO $body$ BEGIN PERFORM 1; PERFORM '$$;'; END $body$; SELECT 1",
            ["DO $body$ BEGIN PERFORM 1; PERFORM '$$;'; END $body$", "SELECT 1"],
        ),
        ("SELECT E'it\\'s; escaped'; SELECT 2", ["SELECT E'it\\'s; escaped'", "SELECT 2"]),
        ("SELECT e'\\\\'; SELECT 2", ["SELECT e'\\\\'", "SELECT 2"]),
        # Without the E prefix a backslash is an ordinary character (standard_conforming_strings).
        ("SELECT 'a\\'; SELECT 2", ["SELECT 'a\\'", "SELECT 2"]),
        ("SELECT 'x'; SELECT $1; SELECT a$b FROM t", ["SELECT 'x'", "SELECT $1", "SELECT a$b FROM t"]),
        (
            "SELECT /* outer /* inner; */ still; */ 1; SELECT 2",
            ["SELECT /* outer /* inner; */ still; */ 1", "SELECT 2"],
        ),
        ("SELECT 1 WHERE 'a' ~ 'b;c'; SELECT 2", ["SELECT 1 WHERE 'a' ~ 'b;c'", "SELECT 2"]),
    ],
)
def test_postgresql_literals_and_bodies(script: str, expected: list[str]) -> None:
    assert split_statements(script, "postgresql") == expected


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument):
        split_statements(b"SELECT 1", "sqlite")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="mysql"):
        split_statements("SELECT 1", "mysql")
