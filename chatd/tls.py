"""TLS for chatd's own listeners (the HTTP API port, a shard's WebSocket port, a shard's admin
port), reloadable without a restart, and the start-up warnings for listeners that carry tokens
in clear text.

:class:`ServerTLS` holds the certificate chain and key of ``server.tls_cert_file`` /
``server.tls_key_file`` (PEM). Each listener takes one *front* context (:meth:`ServerTLS.context`,
with that listener's ALPN protocols); every handshake on it switches, in OpenSSL's server-name
callback (called for every ClientHello, with or without SNI), to the context loaded last.
:meth:`ServerTLS.reload` (SIGHUP, chatd/cli.py) reads the two files again into fresh contexts
and swaps them in only when all of them loaded: new connections get the new certificate,
established ones keep the one they were opened with, and nothing is re-bound.

Contexts: TLS 1.2 or newer, ECDHE+AESGCM suites for TLS 1.2 (TLS 1.3's are OpenSSL's), no
compression (hypercorn's own choices), no client certificates. Keys protected by a passphrase
are refused (a daemon has nobody to type it; OpenSSL would prompt on the terminal).

Errors: at start-up (:meth:`ServerTLS.from_config`) a file that cannot be read or a pair that
does not load (bad PEM, a key that does not match the certificate) is a
:class:`~chatd.config.ConfigError` naming the setting. A reload that fails is logged at ERROR
and changes nothing: the listeners go on with the pair they had.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from urllib.parse import urlsplit

from .config import Config, ConfigError, ServerConfig

log = logging.getLogger(__name__)

CIPHERS = "ECDHE+AESGCM"  # TLS 1.2 suites (hypercorn's default); TLS 1.3 suites are not affected


def _no_passphrase(*_args) -> bytes:
    raise ConfigError("the TLS key is protected by a passphrase; chatd needs an unencrypted key file (mode 0600)")


class ServerTLS:
    """The certificate and key of chatd's listeners; :meth:`reload` swaps them for new connections."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file = cert_file
        self.key_file = key_file
        self._check_readable()
        # alpn protocols -> [front context, context loaded last]; the front one is what a listener holds
        self._contexts: dict[tuple[str, ...], list[ssl.SSLContext]] = {}
        self._load(())  # fail at start-up, not at the first handshake

    @classmethod
    def from_config(cls, server: ServerConfig) -> "ServerTLS | None":
        """The listeners' TLS from ``[server]``; None when no certificate is configured."""
        if not server.tls_cert_file:
            return None
        return cls(server.tls_cert_file, server.tls_key_file)

    def context(self, alpn: tuple[str, ...] | list[str] = ()) -> ssl.SSLContext:
        """The server context for one listener, offering ``alpn`` (e.g. ``("http/1.1",)``);
        its handshakes use the pair loaded last."""
        key = tuple(alpn)
        pair = self._contexts.get(key)
        if pair is None:
            current = self._load(key)
            front = self._load(key)
            holder = self._contexts.setdefault(key, [front, current])

            def use_current(ssl_object, server_name, front_context):
                ssl_object.context = holder[1]
            front.sni_callback = use_current
            pair = holder
        return pair[0]

    def reload(self) -> bool:
        """Read the certificate and key files again; True if the new pair is in use (for every
        listener), False (logged, nothing changed) if it could not be loaded."""
        try:
            self._check_readable()
            fresh = {key: self._load(key) for key in self._contexts}
            if not fresh:
                self._load(())
        except ConfigError as e:
            log.error("TLS reload failed, keeping the certificate in use: %s", e)
            return False
        for key, ctx in fresh.items():
            self._contexts[key][1] = ctx
        log.info("TLS certificate reloaded from %s (new connections use it)", self.cert_file)
        return True

    def _check_readable(self) -> None:
        for name, path in (("server.tls_cert_file", self.cert_file), ("server.tls_key_file", self.key_file)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(f"{name}: cannot read {path}: {e.strerror or e}") from None

    def _load(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(CIPHERS)
        ctx.options |= ssl.OP_NO_COMPRESSION
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file, password=_no_passphrase)
        except ConfigError:
            raise
        except (ssl.SSLError, OSError, ValueError) as e:
            raise ConfigError(f"server.tls_cert_file / server.tls_key_file ({self.cert_file}, {self.key_file}): "
                              f"not a PEM certificate chain and its matching private key ({e})") from None
        return ctx


# ---- warnings -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address or a URL's host) is this machine only: 127.0.0.0/8,
    ::1 or ``localhost``. Empty (every interface) and any other name are not."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


BEHIND_PROXY = ("unless a TLS-terminating proxy on a private network is the only way in; "
                "set server.tls_cert_file and server.tls_key_file (docs/operations.md, \"TLS\")")


def warn_plaintext(config: Config, *, api: bool = False, ws: bool = False) -> list[str]:
    """Log a WARNING for each listener of this role that takes tokens (``api``: the HTTP API with
    its passwords and tokens; ``ws``: the WebSocket port, whose first frame is a token) on an
    address other than loopback without TLS, and for a ``ws://`` ``server.public_ws_url`` naming
    a host other than loopback. Returns the messages (tests)."""
    s = config.server
    tls = bool(s.tls_cert_file)
    out = []
    if api and not tls and not is_loopback(s.api_host):
        out.append(f"server.api_host = {s.api_host!r} is not loopback and the API has no TLS: "
                   f"passwords and tokens cross the network in clear text, {BEHIND_PROXY}")
    if ws and not tls and not is_loopback(s.ws_host):
        out.append(f"server.ws_host = {s.ws_host!r} is not loopback and the WebSocket port has no TLS: "
                   f"clients send their tokens in clear text, {BEHIND_PROXY}")
    if ws and s.public_ws_url.lower().startswith("ws://"):
        host = urlsplit(s.public_ws_url).hostname or ""
        if not is_loopback(host):
            out.append(f"server.public_ws_url = {s.public_ws_url!r} is ws:// on a host other than loopback: "
                       f"clients send their tokens in clear text; give them a wss:// URL")
    for message in out:
        log.warning("%s", message)
    return out
