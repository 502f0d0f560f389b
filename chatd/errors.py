"""Stable, machine-readable error codes shared by the WebSocket protocol and the HTTP API.

A :class:`ChatError` is raised for anything a *client* did wrong or asked for that cannot be
done; the code is part of the public protocol (``docs/protocol.md``) and never changes meaning.
Anything else that escapes is a bug and is reported as ``internal``.
"""

from __future__ import annotations

# code -> HTTP status used when the error reaches the HTTP API.
CODES: dict[str, int] = {
    "bad_frame": 400,  # not valid JSON / msgpack, or not an object
    "unknown_type": 400,  # frame "type" we do not know
    "bad_field": 400,  # missing or wrong-typed field
    "bad_request": 400,  # HTTP body/query not acceptable
    "bad_cursor": 400,  # a resume token (SSE Last-Event-ID, a poll's cursor) that chatd did not make
    "frame_too_large": 413,
    "body_too_long": 413,
    "not_authenticated": 401,
    "already_authenticated": 409,
    "invalid_token": 401,
    "token_expired": 401,
    "bad_credentials": 401,
    "account_disabled": 403,  # login refused: an operator disabled the account (chatd admin users disable)
    "username_taken": 409,
    "registration_closed": 403,  # sign-up is closed (auth.registration)
    "invite_invalid": 403,  # sign-up needs an invite: missing, forged, expired or used up
    "unsupported_media_type": 415,  # an HTTP body that is not Content-Type: application/json
    "forbidden": 403,
    "not_member": 403,
    "no_such_channel": 404,
    "no_such_user": 404,
    "not_found": 404,
    "group_full": 409,
    "push_token_taken": 409,  # the push token is registered to another user's device that is still logged in
    "not_invited": 403,  # joining a group you left needs its owner's invitation (POST .../members)
    # the message lifecycle (chatd/lifecycle.py)
    "no_such_message": 404,  # target_seq / reply_to names no message of the channel
    "not_author": 403,  # edit: only the author; delete: the author or the group's owner
    "edit_window_closed": 403,  # limits.edit_window_s after the message
    "message_deleted": 409,  # the target was deleted: it takes no edit, reaction or second delete
    "bad_emoji": 400,  # a reaction is one grapheme cluster or a short name ':name:'
    "too_many_reactions": 409,  # limits.max_reaction_kinds distinct emoji on one message
    "no_such_media": 404,  # no such upload, or not one the caller may read (the same answer: no probing)
    "media_too_large": 413,  # an upload above media.max_bytes
    "media_quota": 429,  # the hourly upload quota (media.uploads_per_hour / bytes_per_hour); Retry-After
    "bad_attachment": 400,  # send: an attachment that is not the sender's upload, or more than 10
    "rate_limited": 429,
    "too_many_groups": 429,  # limits.groups_created_per_hour (Retry-After)
    "too_many_connections": 429,  # WebSocket: limits.max_connections_per_user / _per_address (close 4029)
    "unavailable": 503,  # store or dependency failed; retry later
    "internal": 500,
}


class ChatError(Exception):
    """An error with a stable code, safe to show to the client."""

    def __init__(self, code: str, message: str, **details):
        assert code in CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    @property
    def http_status(self) -> int:
        return CODES[self.code]

    def to_dict(self) -> dict:
        out = {"code": self.code, "message": self.message}
        out.update(self.details)
        return out

    def __repr__(self):
        return f"ChatError({self.code!r}, {self.message!r})"
