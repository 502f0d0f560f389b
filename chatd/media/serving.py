"""How a download is answered: the headers that keep an uploaded file from running in chatd's
origin, caching, and ``Range`` (pure functions, no I/O).

Every media answer carries ``X-Content-Type-Options: nosniff`` (the browser uses the type chatd
sniffed, never its own guess) and ``Content-Security-Policy: sandbox; default-src 'none'`` (an
HTML or SVG file opened directly is a sandboxed document without scripts, styles or requests).
Only an image, audio or video file of the inline allow-list (:mod:`chatd.media.worker`) is
``Content-Disposition: inline`` with its sniffed type; anything else is ``attachment`` and
``application/octet-stream``. Objects never change under a URL: ``ETag`` is the sha256 of the
bytes, ``Cache-Control: private, max-age=31536000, immutable`` (``private``: a shared cache must
not hand it to somebody the server did not authorize).

``Range``: one ``bytes=`` range (``a-b``, ``a-``, ``-n``) is answered 206 with exactly those bytes;
several ranges are answered 200 with the whole file (RFC 9110 allows it); a range that starts past
the end is 416 with ``Content-Range: bytes */size``.
"""

from __future__ import annotations

from urllib.parse import quote

CSP = "sandbox; default-src 'none'"
CACHE = "private, max-age=31536000, immutable"
PLAIN = "application/octet-stream"


class Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single byte range, None for the whole file;
    :class:`Unsatisfiable` for a range outside it."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise Unsatisfiable()
            return max(0, size - n), size
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    except ValueError:
        return None
    if start < 0 or start >= size or end <= start:
        raise Unsatisfiable()
    return start, end


def headers(mime: str, inline: bool, name: str, sha256: str, size: int) -> dict[str, str]:
    disposition = "inline" if inline else "attachment"
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in name)
    return {"Content-Type": mime if inline else PLAIN, "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": CSP, "Cache-Control": CACHE, "ETag": f'"{sha256}"',
            "Accept-Ranges": "bytes", "Cross-Origin-Resource-Policy": "same-origin",
            "Content-Disposition": f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"}


def not_modified(if_none_match: str | None, sha256: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or f'"{sha256}"' in tags
