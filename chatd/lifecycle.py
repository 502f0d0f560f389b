"""The message lifecycle as sequenced log events: what each event is, who may make it, and how a
client folds the log. Pure: no I/O, no trio, the clock is an argument (docs/protocol.md, "The
message lifecycle", is the same text for client authors).

Every change to what a member sees takes the channel's next seq, like a message: an ``edit``, a
``delete`` (redaction), a ``react`` / ``unreact``, and the system events ``member_added``,
``member_removed``, ``member_left``. A stored row (``chatd.store.base.Message``) carries its
``kind``; a message row is also kept *folded* by the store (its current body, ``edited_at``, who
deleted it, its reactions, ``state_seq``: the seq of the last event folded into it), so history
and sync return each message in its current state, and the events in seq order beside it.

Rules (:func:`check`, run by the channel's owner under the channel's lifecycle lock, against
the target as stored), each with its error code:

* the target (``target_seq``) must be a message of the channel: ``no_such_message``;
* a deleted message takes no further event: ``message_deleted``;
* ``edit``: the author only (``not_author``), within ``limits.edit_window_s`` of the message
  (``edit_window_closed``; 0 = no limit), the body limits of a send (``body_too_long``);
* ``delete``: the author, or the group's owner (moderation): ``not_author`` otherwise;
* ``react`` / ``unreact``: members (checked before, ``not_member``); one emoji: a single
  grapheme cluster or a short name ``:name:`` (``bad_emoji``); at most
  ``limits.max_reaction_kinds`` distinct emoji on a message (``too_many_reactions``). Reacting
  twice, or unreacting what one has not reacted, is stored all the same (idempotent for the
  state: the event's ``count`` is the count after it);
* ``reply_to`` on a send: a message of the same channel (``no_such_message``).

Errors raise :class:`~chatd.errors.ChatError`; nothing here does I/O.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import regex

from .errors import ChatError

MESSAGE = "message"
EDIT, DELETE, REACT, UNREACT = "edit", "delete", "react", "unreact"
MEMBER_ADDED, MEMBER_REMOVED, MEMBER_LEFT = "member_added", "member_removed", "member_left"
RENAMED = "renamed"
TARGETED = frozenset({EDIT, DELETE, REACT, UNREACT})  # events that change one message
SYSTEM = frozenset({MEMBER_ADDED, MEMBER_REMOVED, MEMBER_LEFT, RENAMED})
KINDS = frozenset({MESSAGE}) | TARGETED | SYSTEM

EXCERPT_CHARS = 100  # a reply's quote of its target
MAX_EMOJI_CHARS = 32  # code points in one reaction (a long ZWJ sequence fits)
_SHORT_NAME = re.compile(r":[a-z0-9_+\-]{1,30}:")
_GRAPHEME = regex.compile(r"\X")


@dataclass(frozen=True)
class EventSpec:
    """What a client (or the API, for system events) asks to append, besides a plain send."""
    kind: str
    target_seq: int = 0  # edit / delete / react / unreact
    body: str = ""  # edit: the new body; react / unreact: the emoji
    reply_to: int = 0  # a message with a reply
    user_id: int = 0  # system events: who joined or left
    notify: int = 0  # system events: one more user to tell (the one removed)
    attachments: str = ""  # a message with a reply: its attachments' JSON (chatd/media), as a send's

    def as_dict(self) -> dict:
        """For the link frame that carries it to the owner shard."""
        return {k: v for k, v in (("kind", self.kind), ("target_seq", self.target_seq), ("body", self.body),
                                  ("reply_to", self.reply_to), ("user_id", self.user_id),
                                  ("notify", self.notify), ("attachments", self.attachments)) if v}

    @classmethod
    def from_dict(cls, d: dict) -> "EventSpec":
        kind = d.get("kind")
        if kind not in KINDS:
            raise ChatError("bad_field", f"unknown event kind {str(kind)[:40]!r}")
        ints = {k: d.get(k, 0) for k in ("target_seq", "reply_to", "user_id", "notify")}
        if (any(type(v) is not int or v < 0 for v in ints.values()) or not isinstance(d.get("body", ""), str)
                or not isinstance(d.get("attachments", ""), str)):
            raise ChatError("bad_field", "malformed event")
        return cls(kind, body=d.get("body", ""), attachments=d.get("attachments", ""), **ints)


def check_emoji(emoji: str) -> str:
    """``emoji`` if it is one grapheme cluster that is not plain text (a letter, digit or
    punctuation mark is refused), or a short name like ``:thumbsup:``; else ``bad_emoji``."""
    if 0 < len(emoji) <= MAX_EMOJI_CHARS:
        if _SHORT_NAME.fullmatch(emoji):
            return emoji
        plain = len(emoji) == 1 and (emoji.isalnum() or ord(emoji) < 0x2000)  # a letter, digit, ASCII...
        if _GRAPHEME.fullmatch(emoji) and not plain and not any(unicodedata.category(c) in ("Cc", "Zs", "Zl", "Zp")
                                                                 for c in emoji):
            return emoji
    raise ChatError("bad_emoji", "a reaction is one emoji (a single grapheme cluster) or a short name like "
                                 "':thumbsup:'")


def check(spec: EventSpec, user_id: int, target, group_owner: int | None, now: float, *, edit_window_s: float,
          max_body_chars: int, max_reaction_kinds: int) -> None:
    """Raise the documented error if ``user_id`` may not append ``spec`` to a channel whose
    message ``target_seq`` (or ``reply_to``) is ``target`` (the stored, folded row; None: no such
    seq). ``group_owner``: the group's owner (None for a 1:1 channel)."""
    kind = spec.kind
    if kind == MESSAGE:
        if spec.reply_to and (target is None or target.kind != MESSAGE):
            raise ChatError("no_such_message", f"reply_to: there is no message {spec.reply_to} in this channel")
        return
    if kind not in TARGETED:
        return
    if target is None or target.kind != MESSAGE:
        raise ChatError("no_such_message", f"there is no message {spec.target_seq} in this channel")
    if target.deleted_at:
        raise ChatError("message_deleted", f"message {spec.target_seq} was deleted")
    if kind == EDIT:
        if target.sender_id != user_id:
            raise ChatError("not_author", "only its author edits a message")
        if edit_window_s and now - target.created_at > edit_window_s:
            raise ChatError("edit_window_closed", f"a message can be edited for {edit_window_s:g} s after it was sent")
        if len(spec.body) > max_body_chars:
            raise ChatError("body_too_long", f"a message body has at most {max_body_chars} characters")
    elif kind == DELETE:
        if target.sender_id != user_id and user_id != group_owner:
            raise ChatError("not_author", "only its author (or the group's owner) deletes a message")
    else:
        check_emoji(spec.body)
        if kind == REACT and spec.body not in dict(target.reactions) and len(target.reactions) >= max_reaction_kinds:
            raise ChatError("too_many_reactions", f"a message has at most {max_reaction_kinds} different reactions")


def reaction_count_after(spec: EventSpec, user_id: int, target) -> int:
    """How many users hold the reaction ``spec.body`` on ``target`` once ``spec`` applies."""
    users = set(dict(target.reactions).get(spec.body, ()))
    if spec.kind == REACT:
        users.add(user_id)
    else:
        users.discard(user_id)
    return len(users)


def reactions_after(reactions: tuple, kind: str, emoji: str, user_id: int) -> tuple:
    """A message's reactions ``((emoji, (user ids...)), ...)`` in order of first reaction, after a
    react / unreact (an emoji nobody holds any more is dropped)."""
    out = []
    found = False
    for e, users in reactions:
        if e == emoji:
            found = True
            us = set(users)
            us.add(user_id) if kind == REACT else us.discard(user_id)
            if us:
                out.append((e, tuple(sorted(us))))
        else:
            out.append((e, users))
    if not found and kind == REACT:
        out.append((emoji, (user_id,)))
    return tuple(out)


def excerpt(target) -> dict:
    """The quote a reply carries of its target (``deleted`` once it is)."""
    if target.deleted_at:
        return {"seq": target.seq, "sender_id": target.sender_id, "deleted": True, "excerpt": ""}
    return {"seq": target.seq, "sender_id": target.sender_id, "excerpt": target.body[:EXCERPT_CHARS]}


# ---- the client's fold (docs/protocol.md); the reference model of the tests and the bench -------
class ChannelView:
    """One device's folded view of one channel, built from ``message`` frames in seq order
    (live, sync or history pages, in any mix): :meth:`apply` each frame once. ``me``: the
    device's user (for "did I react")."""

    def __init__(self, me: int):
        self.me = me
        self.messages: dict[int, dict] = {}
        self.pending: dict[int, list[dict]] = {}  # target seq -> events whose target is not held

    def apply(self, f: dict) -> None:
        kind = f.get("kind", MESSAGE)
        if kind == MESSAGE:
            state = {"sender_id": f["sender_id"], "body": f["body"], "edited_at": f.get("edited_at"),
                     "deleted": f.get("deleted"), "reply_to": f.get("reply_to", 0),
                     "reactions": {r["emoji"]: r["count"] for r in f.get("reactions", ())},
                     "mine": {r["emoji"] for r in f.get("reactions", ()) if r.get("me")},
                     "state_seq": f.get("state_seq", f["seq"])}
            old = self.messages.get(f["seq"])
            if old is not None and old["state_seq"] >= state["state_seq"]:
                return  # what we hold is as new (a page read again)
            self.messages[f["seq"]] = state
            for ev in sorted(self.pending.pop(f["seq"], ()), key=lambda e: e["seq"]):
                self._fold(state, ev)
        elif kind in TARGETED:
            state = self.messages.get(f["target_seq"])
            if state is None:
                self.pending.setdefault(f["target_seq"], []).append(f)
            else:
                self._fold(state, f)

    def _fold(self, m: dict, ev: dict) -> None:
        if ev["seq"] <= m["state_seq"] or ev.get("redacted"):
            return  # folded in already (the message came later than the event), or redacted
        m["state_seq"] = ev["seq"]
        kind = ev["kind"]
        if kind == EDIT:
            m["body"], m["edited_at"] = ev["body"], ev["created_at"]
        elif kind == DELETE:
            m.update(body="", edited_at=None, reactions={}, mine=set(),
                     deleted={"by": ev["sender_id"], "at": ev["created_at"], "seq": ev["seq"]})
        else:
            emoji = ev["emoji"]
            if ev["count"]:
                m["reactions"][emoji] = ev["count"]
            else:
                m["reactions"].pop(emoji, None)
            if ev["sender_id"] == self.me:
                m["mine"].add(emoji) if kind == REACT else m["mine"].discard(emoji)

    def snapshot(self) -> dict:
        """Comparable state: seq -> (sender, body, edited_at, deleted by, reactions, mine, reply_to)."""
        return {seq: (m["sender_id"], m["body"], m["edited_at"], (m["deleted"] or {}).get("by"),
                      tuple(sorted(m["reactions"].items())), tuple(sorted(m["mine"])), m["reply_to"])
                for seq, m in self.messages.items()}
