"""The push gateway client (chatd/push/http.py, httpx) against real servers on loopback (hypercorn
serving a small ASGI app, plain and TLS): connections are pooled, TLS is verified against the
system's CA store, proxies come from the environment, the whole exchange is bounded, answers are
capped, and every transport failure is a ``TransportError``."""

from __future__ import annotations

import functools

import pytest
import trio
import trustme
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from chatd.push.http import MAX_RESPONSE_BYTES, GatewayClient, TransportError


class Server:
    """An HTTP server recording each request's client port (one per connection) and target."""

    def __init__(self, answer: bytes = b"{}", delay_s: float = 0.0):
        self.answer, self.delay_s = answer, delay_s
        self.requests: list[tuple[int, str, str, bytes]] = []  # (client port, target, host, body)
        self.url = ""

    async def app(self, scope, receive, send):
        if scope["type"] != "http":
            raise RuntimeError("no lifespan")  # hypercorn goes on without it
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = dict(scope["headers"])
        target = scope["raw_path"].decode() + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        self.requests.append((scope["client"][1], target, headers[b"host"].decode(), body))
        await trio.sleep(self.delay_s)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": self.answer})

    async def start(self, nursery, cert: trustme.LeafCert | None = None, tmp_path=None) -> "Server":
        hc = HyperConfig()
        hc.bind = ["127.0.0.1:0"]
        hc.accesslog = hc.errorlog = None
        scheme = "http"
        if cert is not None:
            certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
            cert.cert_chain_pems[0].write_to_path(certfile)
            cert.private_key_pem.write_to_path(keyfile)
            hc.certfile, hc.keyfile = str(certfile), str(keyfile)
            scheme = "https"
        binds = await nursery.start(functools.partial(serve, self.app, hc))
        self.url = f"{scheme}://127.0.0.1:{binds[0].rsplit(':', 1)[1]}"
        return self


@pytest.fixture(autouse=True)
def no_proxy_from_ci(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "NO_PROXY", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)


async def test_connections_are_pooled(nursery):
    srv = await Server().start(nursery)
    client = GatewayClient()
    try:
        for i in range(5):
            r = await client.post(srv.url + f"/notify?n={i}", b'{"x": %d}' % i, [("X-Test", "1")], 5.0)
            assert r.status == 200 and r.body == b"{}" and r.headers["content-type"] == "application/json"
        assert [t for _, t, _, _ in srv.requests] == [f"/notify?n={i}" for i in range(5)]
        assert len({port for port, _, _, _ in srv.requests}) == 1  # one connection, kept alive
        # concurrent pushes open more connections, and they are reused too
        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(client.post, srv.url + "/", b"{}", [], 5.0)
        assert len({port for port, _, _, _ in srv.requests}) <= 4
    finally:
        await client.aclose()


async def test_tls_is_verified_against_the_system_store(nursery, tmp_path, monkeypatch):
    ca = trustme.CA()
    srv = await Server().start(nursery, ca.issue_cert("127.0.0.1"), tmp_path)
    client = GatewayClient()
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await client.post(srv.url + "/", b"{}", [], 5.0)
    await client.aclose()
    assert srv.requests == []
    # the system store is OpenSSL's default paths: SSL_CERT_FILE names a CA it then trusts
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    client = GatewayClient()
    try:
        assert (await client.post(srv.url + "/", b"{}", [], 5.0)).status == 200
    finally:
        await client.aclose()


async def test_proxy_from_the_environment(nursery, monkeypatch):
    proxy = await Server().start(nursery)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    client = GatewayClient()
    try:
        r = await client.post("http://gateway.invalid:8088/_matrix/push/v1/notify", b"{}", [], 5.0)
    finally:
        await client.aclose()
    assert r.status == 200
    [(_, target, host, body)] = proxy.requests
    assert target == "http://gateway.invalid:8088/_matrix/push/v1/notify" and host == "gateway.invalid:8088"


async def test_failures_are_transport_errors_and_bounded(nursery):
    slow = await Server(delay_s=30).start(nursery)
    huge = await Server(answer=b"x" * (3 * MAX_RESPONSE_BYTES)).start(nursery)
    client = GatewayClient()
    try:
        with trio.fail_after(10):
            with pytest.raises(TransportError, match="no answer within|Timeout"):
                await client.post(slow.url + "/", b"{}", [], 0.5)
        r = await client.post(huge.url + "/", b"{}", [], 5.0)
        assert r.status == 200 and r.body == b"x" * MAX_RESPONSE_BYTES
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()
        with pytest.raises(TransportError, match="Connect"):
            await client.post(f"http://127.0.0.1:{port}/", b"{}", [], 5.0)
        with pytest.raises(TransportError):
            await client.post("http://name-that-does-not-resolve.invalid/", b"{}", [], 5.0)
    finally:
        await client.aclose()
    with pytest.raises(ValueError):
        await GatewayClient().post("ftp://x/", b"", [], 1.0)
