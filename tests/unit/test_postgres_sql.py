"""The ``?`` -> psycopg translation of ``Tx`` and query SQL (:func:`to_psycopg`), as a scanner of
PostgreSQL's lexical elements. Every case here is also run on a real server by
``tests/integration/test_postgres_settings.py``."""

from __future__ import annotations

import pytest

from tidings.store.postgres import to_psycopg

# (sql, params, translated)
CASES = [
    # placeholders
    ("SELECT ?, ?", (1, 2), "SELECT %s, %s"),
    ("SELECT :a::int, :b_2", {"a": 1, "b_2": 2}, "SELECT %(a)s::int, %(b_2)s"),
    (":a", {"a": 1}, "%(a)s"),
    ("SELECT ?::text", (1,), "SELECT %s::text"),
    ("SELECT x FROM t WHERE a=?AND b=?", (1, 2), "SELECT x FROM t WHERE a=%sAND b=%s"),
    # % is always doubled, with or without parameters
    ("SELECT 7 % 2", (), "SELECT 7 %% 2"),
    ("SELECT 'ab' LIKE 'a%'", (), "SELECT 'ab' LIKE 'a%%'"),
    ("SELECT 'ab' LIKE ? || '%'", ("a",), "SELECT 'ab' LIKE %s || '%%'"),
    ("SELECT '%s'", (), "SELECT '%%s'"),
    # ?? is a literal ? (PostgreSQL's JSON operators)
    ("SELECT '{\"a\":1}'::jsonb ?? 'a'", (), "SELECT '{\"a\":1}'::jsonb ? 'a'"),
    ("SELECT j ??| array['a'], j ??& array[?]", ("b",), "SELECT j ?| array['a'], j ?& array[%s]"),
    ("SELECT j ?? :k", {"k": "a"}, "SELECT j ? %(k)s"),
    # standard strings: '' escapes, no backslash escapes, nothing inside is translated
    ("SELECT 'it''s ?', ?", (1,), "SELECT 'it''s ?', %s"),
    ("SELECT 'a\\', ?", (1,), "SELECT 'a\\', %s"),
    ("SELECT ':a'", {"a": 1}, "SELECT ':a'"),
    # escape strings: \' and \\ inside; E must be a token of its own
    ("SELECT E'it\\'s ?', ?", (1,), "SELECT E'it\\'s ?', %s"),
    ("SELECT e'\\\\', ?", (1,), "SELECT e'\\\\', %s"),
    ("SELECT E'a''b?', ?", (1,), "SELECT E'a''b?', %s"),
    ("SELECT E'100%'", (), "SELECT E'100%%'"),
    ("SELECT name FROM (SELECT 'x' AS name) e WHERE name = ?", ("x",), None),
    # dollar quoting, with and without tags; $1 and identifiers with $ are not quotes
    ("SELECT $$it's ? 100%$$, ?", (1,), "SELECT $$it's ? 100%%$$, %s"),
    ("SELECT $fn$ $$ ? $fn$, ?", (1,), "SELECT $fn$ $$ ? $fn$, %s"),
    ("SELECT $a_1$?$a_1$ || $$'$$, ?", (1,), "SELECT $a_1$?$a_1$ || $$'$$, %s"),
    ("SELECT 1 AS a$b, ?", (1,), "SELECT 1 AS a$b, %s"),
    # quoted identifiers
    ('SELECT 1 AS "a?b", ?', (1,), 'SELECT 1 AS "a?b", %s'),
    ('SELECT 1 AS "a""?", ?', (1,), 'SELECT 1 AS "a""?", %s'),
    ('SELECT 1 AS "100%"', (), 'SELECT 1 AS "100%%"'),
    # comments, nested block comments
    ("SELECT ? -- why? 100%\n, ?", (1, 2), "SELECT %s -- why? 100%%\n, %s"),
    ("SELECT /* ? /* ? */ ? */ ?", (1,), "SELECT /* ? /* ? */ ? */ %s"),
    ("SELECT 1 -- ?", (), "SELECT 1 -- ?"),
]


@pytest.mark.parametrize(("sql", "params", "expected"), CASES)
def test_translation(sql: str, params: tuple[object, ...] | dict[str, object], expected: str | None) -> None:
    assert to_psycopg(sql, params) == (expected if expected is not None else sql.replace("?", "%s"))


def test_unterminated_elements_run_to_the_end() -> None:
    # The server reports the syntax error; the scanner must neither loop nor translate inside.
    assert to_psycopg("SELECT 'a ?", ()) == "SELECT 'a ?"
    assert to_psycopg("SELECT $$ ?", ()) == "SELECT $$ ?"
    assert to_psycopg("SELECT /* ?", ()) == "SELECT /* ?"
    assert to_psycopg('SELECT "?', ()) == 'SELECT "?'
    assert to_psycopg("SELECT E'\\", ()) == "SELECT E'\\"
