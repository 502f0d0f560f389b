"""The client address of an HTTP request: the TCP peer, or, when the peer is a trusted reverse proxy
(``server.trusted_proxies``), what the proxy says in ``server.proxy_header`` (``X-Forwarded-For``
or RFC 7239 ``Forwarded``).

Only the header the operator names is read: a proxy that sets one of them passes the other through
as the client sent it. The hops are read from the right (the nearest proxy's entry last); the
client is the right-most hop that is not a trusted proxy, so whatever a client puts in the header
itself (left of what the proxies append) is never taken while an untrusted hop follows it. A hop
that is not an address (``unknown``, an obfuscated RFC 7239 name) ends the walk and is the client.
A request from a trusted peer without the header is the peer's own.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PROXY_HEADERS = ("x-forwarded-for", "forwarded")


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # [v6] or [v6]:port
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    return addr.ipv4_mapped or addr if isinstance(addr, ipaddress.IPv6Address) else addr


def _hops(header: str, values: list[str]) -> list[str]:
    joined = ",".join(values)
    if header == "x-forwarded-for":
        return [h.strip() for h in joined.split(",") if h.strip()]
    out = []
    for element in joined.split(","):
        for pair in element.split(";"):
            key, _, value = pair.partition("=")
            if key.strip().lower() == "for":
                out.append(value.strip())
    return out


def client_address(peer: str, header_values: list[str], trusted: tuple[Network, ...],
                   header: str = "x-forwarded-for") -> str:
    """The client's address (module docstring). ``header_values``: every value of ``header``
    in the request, in order."""
    def is_trusted(addr) -> bool:
        return addr is not None and any(addr in net for net in trusted)

    if not trusted or not is_trusted(_address(peer)):
        return peer
    for hop in reversed(_hops(header, header_values)):
        addr = _address(hop)
        if addr is None:
            return hop.strip().strip('"')[:64] or peer
        if not is_trusted(addr):
            return str(addr)
    return peer


def install(app, trusted_proxies: Iterable[str], header: str) -> None:
    """Make :func:`request_address` answer for ``app``'s requests."""
    app.extensions["chatd.client_address"] = (parse_networks(trusted_proxies), header)


def request_address() -> str:
    """The client address of the current request (quart's ``request``)."""
    from quart import current_app, request
    trusted, header = current_app.extensions.get("chatd.client_address", ((), "x-forwarded-for"))
    return client_address(request.remote_addr or "?", request.headers.getlist(header), trusted, header)
