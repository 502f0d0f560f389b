"""A guard that needs no server: no identifier chatd writes into CQL is a reserved keyword.

Schema v2 once named a column ``token``, a reserved keyword of CQL: every real Cassandra refused the
DDL (``no viable alternative at input 'token'``), while the emulated keyspace never noticed. This
test reads every identifier - keyspace-level names (tables), column names - out of the DDL of
:data:`MIGRATIONS` and out of every statement of :data:`STATEMENTS`, by where CQL's grammar puts
names, and checks them against the reserved keywords of Cassandra's own list
(tests/cql_reserved_keywords.txt). A statement form the extractor does not know fails the test too,
so a new kind of statement cannot slip past it unchecked.
"""

from __future__ import annotations

import re
import pytest

from chatd.store.cassandra_schema import MIGRATIONS, STATEMENTS
from tests.helpers import reserved_keywords


# ---- extracting identifiers ----------------------------------------------------------------------
_WORD = r"[A-Za-z_][A-Za-z0-9_]*"
_NAME = rf"(?:{_WORD}\.)?({_WORD})"  # [keyspace.]name -> name
_DDL_TABLE = re.compile(rf"CREATE TABLE (?:IF NOT EXISTS )?{_NAME} (\(.*)$", re.I | re.S)
_DDL_ALTER_ADD = re.compile(rf"ALTER TABLE (?:IF EXISTS )?{_NAME} ADD (?:IF NOT EXISTS )?(.*)$", re.I | re.S)
_DDL_INDEX = re.compile(rf"CREATE (?:CUSTOM )?INDEX (?:IF NOT EXISTS )?({_WORD}) ON {_NAME} \((.*)\)(?: USING .*)?$",
                        re.I | re.S)
_SELECT = re.compile(rf"SELECT (.+?) FROM {_NAME}(?: WHERE (.+?))?(?: ORDER BY (.+?))?(?: LIMIT \S+)?"
                     r"(?: ALLOW FILTERING)?$", re.I)
_INSERT = re.compile(rf"INSERT INTO {_NAME} \((.+?)\) VALUES \(.+?\)(?: IF NOT EXISTS)?(?: USING .+)?$", re.I)
_UPDATE = re.compile(rf"UPDATE {_NAME}(?: USING (?:TIMESTAMP|TTL) \S+(?: AND (?:TIMESTAMP|TTL) \S+)?)? "
                     r"SET (.+?) WHERE (.+?)(?: IF (EXISTS|.+))?$", re.I)
_DELETE = re.compile(rf"DELETE(?: (.+?))? FROM {_NAME}(?: USING TIMESTAMP \S+)? WHERE (.+?)(?: IF (EXISTS|.+))?$",
                     re.I)


def split_top(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside (), <> and quotes; stripped parts."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "(<":
            depth += 1
        elif ch in ")>":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


def _leading_names(items: list[str]) -> list[str]:
    """``["a int", "b = ?", "(c, d) > (?, ?)"]`` -> ``["a", "b", "c", "d"]``: the name(s) each item starts with."""
    out = []
    for item in items:
        if item.startswith("("):  # a tuple of columns: (a, b) op ...
            out += [m.group(0) for m in re.finditer(_WORD, item[1:item.index(")")])]
            continue
        m = re.match(_WORD, item)
        if not m:
            raise ValueError(f"no name at the start of {item!r}")
        out.append(m.group(0))
    return out


def _conditions(text: str | None) -> list[str]:
    if not text or text.upper() == "EXISTS":
        return []
    if text.upper().startswith("NOT EXISTS"):
        return []
    return _leading_names(split_top(re.sub(r"\s+AND\s+", "\0", text, flags=re.I), "\0"))


def _parenthesised(text: str) -> tuple[str, str]:
    """``"(a, (b)) rest"`` -> ``("a, (b)", "rest")``."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return text[1:i], text[i + 1:].strip()
    raise ValueError(f"unbalanced parentheses in {text!r}")


def _columns_of_table_body(body: str) -> list[str]:
    names = []
    for item in split_top(body):
        if re.match(r"PRIMARY\s+KEY\b", item, re.I):
            inner = item[item.index("(") + 1:item.rindex(")")]
            names += re.findall(_WORD, inner)
        else:
            names += _leading_names([item])
    return names


def ddl_identifiers(ddl: str) -> list[tuple[str, str]]:
    """``[(what, name)]`` of one schema statement; ``ValueError`` for a form this guard does not know."""
    text = " ".join(ddl.split())
    if m := _DDL_TABLE.match(text):
        table, rest = m.groups()
        body, options = _parenthesised(rest)
        if options and not options.upper().startswith("WITH "):
            raise ValueError(f"the reserved-word guard does not know what follows a table's columns: {options!r}")
        out = [("table", table)] + [("column", c) for c in _columns_of_table_body(body)]
        if options and (order := re.search(r"CLUSTERING ORDER BY \((.*?)\)", options, re.I)):
            out += [("column", c) for c in _leading_names(split_top(order.group(1)))]
        return out
    if m := _DDL_ALTER_ADD.match(text):
        table, added = m.groups()
        added = added[1:-1] if added.startswith("(") else added
        return [("table", table)] + [("column", c) for c in _leading_names(split_top(added))]
    if m := _DDL_INDEX.match(text):
        index, table, target = m.groups()
        return [("index", index), ("table", table), ("column", re.sub(r"^\w+\((.*)\)$", r"\1", target.strip()))]
    raise ValueError(f"the reserved-word guard does not know this schema statement form: {text[:80]!r}")


def statement_identifiers(cql: str) -> list[tuple[str, str]]:
    """``[(what, name)]`` of one data statement; ``ValueError`` for a form this guard does not know."""
    text = " ".join(cql.split())
    if m := _SELECT.match(text):
        cols, table, where, order = m.groups()
        selected = [] if cols.strip() == "*" else [re.sub(r"^\w+\((.*)\)$", r"\1", c) for c in split_top(cols)]
        return ([("table", table)] + [("column", c) for c in _leading_names(selected)]
                + [("column", c) for c in _conditions(where)]
                + [("column", c) for c in _leading_names(split_top(order or ""))])
    if m := _INSERT.match(text):
        table, cols = m.groups()
        return [("table", table)] + [("column", c) for c in _leading_names(split_top(cols))]
    if m := _UPDATE.match(text):
        table, sets, where, cond = m.groups()
        return ([("table", table)] + [("column", c) for c in _leading_names(split_top(sets))]
                + [("column", c) for c in _conditions(where) + _conditions(cond)])
    if m := _DELETE.match(text):
        cols, table, where, cond = m.groups()
        return ([("table", table)] + [("column", c) for c in _leading_names(split_top(cols or ""))]
                + [("column", c) for c in _conditions(where) + _conditions(cond)])
    raise ValueError(f"the reserved-word guard does not know this statement form: {text[:80]!r}")


def reserved_identifiers(migrations, statements) -> list[str]:
    """Every use of a reserved keyword as an identifier, one line each (empty: all good)."""
    reserved = reserved_keywords()
    found = []
    for version, ddls in migrations:
        for ddl in ddls:
            for what, name in ddl_identifiers(ddl.format(ks="ks")):
                if name.lower() in reserved:
                    found.append(f"schema v{version}: {what} {name!r} in {' '.join(ddl.split())[:60]!r}...")
    for stmt_name, (_kind, cql) in statements.items():
        for what, name in statement_identifiers(cql):
            if name.lower() in reserved:
                found.append(f"statement {stmt_name}: {what} {name!r}")
    return found


# ---- the guard ------------------------------------------------------------------------------------
def test_keyword_list_is_cassandras():
    words = reserved_keywords()
    assert len(words) == 57  # Cassandra 5.0.6's reserved_keywords.txt
    assert {"token", "select", "from", "table", "to", "is"} <= words
    assert not words & {"key", "text", "static", "timestamp", "ttl", "values"}  # unreserved: fine as names


def test_no_identifier_of_schema_or_statements_is_reserved():
    assert reserved_identifiers(MIGRATIONS, STATEMENTS) == []


def test_guard_reads_every_name():
    """The extractor finds the names that matter (so the guard above is not vacuous)."""
    ddl_names = {n for _v, ddls in MIGRATIONS for d in ddls for _w, n in ddl_identifiers(d.format(ks="ks"))}
    assert {"push_tokens", "push_token", "messages", "channel_id", "bucket", "seq", "member_version",
            "user_id", "gc_grace_seconds"} - ddl_names == {"gc_grace_seconds"}  # options are no identifiers
    assert statement_identifiers(STATEMENTS["push_mark_set"][1]) == [
        ("table", "push_marks"), ("column", "seq"), ("column", "user_id"), ("column", "channel_id"),
        ("column", "push_token")]
    assert statement_identifiers(STATEMENTS["msg_asc"][1])[:3] == [("table", "messages"), ("column", "seq"),
                                                                   ("column", "sender_id")]
    assert ("column", "bucket_head") in statement_identifiers(STATEMENTS["bucket_advance"][1])[-1:]


def test_guard_catches_the_old_token_column():
    """The v2 DDL and statements as they were before the rename (commit 8fd066b): caught."""
    v2 = dict(MIGRATIONS)[2]
    old_ddl = [d.replace("push_token text", "token text").replace("), push_token))", "), token))") for d in v2]
    old_statements = {
        "push_token_get": ("read", "SELECT token, user_id, device_id, provider, app_id, created_at "
                                   "FROM push_tokens WHERE token = ?"),
        "push_user_token_delete": ("write", "DELETE FROM push_tokens_by_user WHERE user_id = ? AND token = ?"),
        "push_mark_set": ("write", "UPDATE push_marks USING TIMESTAMP ? SET seq = ? WHERE user_id = ? "
                                   "AND channel_id = ? AND token = ?"),
    }
    found = reserved_identifiers([(2, old_ddl)], old_statements)
    # the DDL: push_tokens (1), push_tokens_by_user and push_marks (column + primary key: 2 each);
    # the statements: push_token_get (selected + WHERE), the delete and the update (1 each)
    assert sum("column 'token'" in f for f in found) == 5 + 4
    assert any(f.startswith("statement push_token_get: column 'token'") for f in found)
    assert any(f.startswith("statement push_mark_set: column 'token'") for f in found)


@pytest.mark.parametrize("ddl, name", [
    ("CREATE TABLE IF NOT EXISTS {ks}.select (id int PRIMARY KEY)", "select"),
    ("CREATE TABLE IF NOT EXISTS {ks}.t (id int, limit int, PRIMARY KEY ((id), limit))", "limit"),
    ("CREATE TABLE IF NOT EXISTS {ks}.t (id int PRIMARY KEY, m map<text, int>) WITH CLUSTERING ORDER BY "
     "(order DESC)", "order"),
    ("ALTER TABLE {ks}.messages ADD token text", "token"),
    ("ALTER TABLE {ks}.messages ADD (head bigint STATIC, to text STATIC)", "to"),
])
def test_guard_catches_reserved_names_in_every_ddl_form(ddl, name):
    assert any(f"'{name}'" in f for f in reserved_identifiers([(9, [ddl])], {}))


@pytest.mark.parametrize("cql, name", [
    ("SELECT a, to FROM t WHERE k = ?", "to"),
    ("SELECT a FROM t WHERE k = ? AND is > ? ORDER BY is ASC LIMIT ?", "is"),
    ("INSERT INTO t (k, view) VALUES (?, ?) IF NOT EXISTS", "view"),
    ("UPDATE t USING TIMESTAMP ? SET a = ? WHERE k = ? IF null = ?", "null"),
    ("DELETE FROM t WHERE k = ? IF full = ?", "full"),
    ("SELECT a FROM schema WHERE k = ?", "schema"),
])
def test_guard_catches_reserved_names_in_every_statement_form(cql, name):
    assert any(f"'{name}'" in f for f in reserved_identifiers([], {"s": ("read", cql)}))


def test_guard_refuses_statement_forms_it_cannot_read():
    with pytest.raises(ValueError, match="does not know"):
        reserved_identifiers([], {"s": ("write", "TRUNCATE t")})
    with pytest.raises(ValueError, match="does not know"):
        reserved_identifiers([(9, ["CREATE TYPE {ks}.address (street text)"])], {})
