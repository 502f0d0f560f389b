"""Pure pieces of the operator tools, in memory: the copy's digests and progress display, the admin
token, the --before parser, log levels, the retention policy."""

from __future__ import annotations

import io

import click
import pytest

from chatd.admincli import parse_when
from chatd.api.adminauth import check_admin_token, issue_admin_token
from chatd.config import RetentionConfig
from chatd.errors import ChatError
from chatd.logsetup import parse_levels
from chatd.store.records import KEY_FIELDS, KINDS, Digest, comparable
from chatd.storecli import Progress

SECRET = "s" * 40


def test_every_kind_has_its_key_and_the_digest_ignores_order_but_not_content():
    assert set(KINDS) == set(KEY_FIELDS) and all(0 < KEY_FIELDS[k] <= len(KINDS[k]) for k in KINDS)
    rows = [(1, "a", 1.5), (2, "b", 2.5), (3, "c", 3.5)]
    a, b, c = Digest(), Digest(), Digest()
    for r in rows:
        a.add(r)
    for r in reversed(rows):
        b.add(r)
    for r in [rows[0], rows[1], (3, "c", 3.25)]:
        c.add(r)
    assert a.hexdigest() == b.hexdigest() and a.count == b.count == 3
    assert c.hexdigest() != a.hexdigest()
    # approximate fields (TTL-kept expiries) are left out of the comparison
    assert comparable("invite_uses", ("inv", 2, 100.0)) == comparable("invite_uses", ("inv", 2, 101.0))
    assert comparable("users", KINDS["users"]) == tuple(KINDS["users"])


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_bar_on_a_terminal_and_lines_otherwise():
    tty = Terminal()
    p = Progress(tty)
    p("messages", 50, 200)
    assert "\r" in tty.getvalue() and "[#######" in tty.getvalue() and "50/200" in tty.getvalue()
    p.finish_kind()
    assert tty.getvalue().endswith("\n")
    plain = io.StringIO()
    p = Progress(plain)
    p("users", 3, None)
    p("users", 7, None)
    p("channels", 2, 2)
    p.finish_kind()
    lines = plain.getvalue().splitlines()
    assert [line.split(" in ")[0] for line in lines] == ["copying users: 7", "copying channels: 2"]


def test_admin_tokens():
    token = issue_admin_token(SECRET, now=1000.0)
    check_admin_token(SECRET, f"Bearer {token}", now=1030.0)
    for header, code in [("", "not_authenticated"), (f"Bearer {token}x", "invalid_token"),
                         (f"Bearer {issue_admin_token('t' * 40, now=1000.0)}", "invalid_token"),
                         ("Bearer v1.user-token", "invalid_token")]:
        with pytest.raises(ChatError) as e:
            check_admin_token(SECRET, header, now=1030.0)
        assert e.value.code == code, header
    with pytest.raises(ChatError) as e:
        check_admin_token(SECRET, f"Bearer {token}", now=1061.0)  # 60 s later: expired
    assert "expired" in e.value.message
    forged_long = token.replace("chatd-admin.v1.1000.1060.", "chatd-admin.v1.1000.9999999.")
    with pytest.raises(ChatError):
        check_admin_token(SECRET, f"Bearer {forged_long}", now=1030.0)


def test_parse_when():
    assert parse_when("2026-01-01") == 1767225600.0
    assert parse_when("2026-01-01T00:01") == 1767225660.0
    assert parse_when("1767225600.5") == 1767225600.5
    with pytest.raises(click.BadParameter):
        parse_when("yesterday")


def test_log_levels_and_retention_policy():
    assert parse_levels(["chatd.shard=debug", "cassandra = WARNING"]) == {"chatd.shard": 10, "cassandra": 30}
    for bad in (["chatd.shard"], ["=debug"], ["chatd=loud"]):
        with pytest.raises(ValueError):
            parse_levels(bad)
    p = RetentionConfig(messages_days=30, dm_messages_days=0)
    assert (p.days_for("dm"), p.days_for("group")) == (0, 30)  # DMs forever, groups 30 days
    p = RetentionConfig(group_messages_days=7)
    assert (p.days_for("dm"), p.days_for("group")) == (0, 7)
