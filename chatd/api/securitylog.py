"""Security events of the HTTP API, one INFO line each on the ``chatd.security`` logger (route it
with the logging configuration): ``event=<name> outcome=<outcome>`` then ``user=``, ``device=``,
``addr=`` and, for some, ``username=`` or ``reason=``. Never a token, an invite or a password.

Events: ``login`` (``ok``, ``failed``, ``throttled``, ``busy``), ``logout`` (``ok``), ``token``
(``revoked``: a revoked token was presented), ``signup`` (``ok``, ``refused`` with a reason:
``closed``, ``throttled``, ``invite``, ``taken``, ``busy``), ``invite`` (``used``), ``push_token``
(``refused``: another user's logged-in device holds it; ``moved``: from a logged-out one; with
``holder=``, that user).
"""

from __future__ import annotations

import logging

log = logging.getLogger("chatd.security")


def _clean(value) -> str:
    text = str(value)
    return "".join(c if c.isprintable() and c != " " else "?" for c in text[:64])  # one line, one field


def event(name: str, outcome: str, **fields) -> None:
    if log.isEnabledFor(logging.INFO):
        rest = " ".join(f"{k}={_clean(v)}" for k, v in fields.items() if v is not None)
        fields = {k: v[:64] if isinstance(v, str) else v for k, v in fields.items() if v is not None}
        log.info("event=%s outcome=%s %s", name, outcome, rest,
                 extra={"security": {"event": name, "outcome": outcome, **fields}})
