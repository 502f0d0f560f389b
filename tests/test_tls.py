"""Issue 20: chatd terminates TLS itself. A certificate made by the test (``trustme``) on the API
port (hypercorn's TLS) and the WebSocket port (``trio.SSLStream``), clients that verify it, the
login answer's ``wss://``, a client that does not trust the CA failing the handshake, the reload
(in process and by SIGHUP to a real ``chatd run``): new connections see the new certificate,
established ones go on; a failed reload keeps the old pair; the warning for a listener that is
not loopback without TLS; the start-up errors of a bad pair; the TLS handshake's deadline.

Traffic goes to 127.0.0.1 only (a server bound to 0.0.0.0 is only started, never spoken to on
another address)."""

from __future__ import annotations

import logging
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from trio_websocket import wrap_client_stream

import chatd.shard.server as shard_server
from chatd.config import Config, ConfigError
from chatd.tls import ServerTLS, is_loopback, warn_plaintext
from tests.helpers import PASSWORD, WSClient, RunningServer, eventually, free_port, make_config

pytestmark = pytest.mark.timeout(120)


class Pki:
    """A CA of the test's own, a certificate it issued for 127.0.0.1/localhost, written to PEM
    files (``cert.pem``: the chain, ``key.pem``) that :meth:`issue` replaces in place."""

    def __init__(self, tmp_path: Path):
        self.ca = trustme.CA()
        self.cert_file = tmp_path / "cert.pem"
        self.key_file = tmp_path / "key.pem"
        self.der = self.issue()

    def issue(self) -> bytes:
        """A fresh certificate (same names) into the files; its DER, to compare peers' with."""
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        self.key_file.write_bytes(cert.private_key_pem.bytes())
        self.key_file.chmod(0o600)
        return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def settings(self) -> dict:
        return {"tls_cert_file": str(self.cert_file), "tls_key_file": str(self.key_file)}


@pytest.fixture
def pki(tmp_path):
    (tmp_path / "pki").mkdir()
    return Pki(tmp_path / "pki")


def tls_config(tmp_path, pki: Pki, **server) -> Config:
    cfg = make_config(tmp_path)
    cfg.update({"server": {**pki.settings(), **server}}, source="test")
    cfg.validate()
    return cfg


@pytest.fixture
async def tls_server(nursery, tmp_path, pki):
    srv = RunningServer(nursery, tls_config(tmp_path / "srv", pki))
    await srv.start()
    yield srv
    if not srv.stopped:
        await srv.stop()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


async def https(srv, pki, method, path, body=None, token=None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(verify=pki.client_context(), timeout=30) as client:
        return await client.request(method, srv.info.api_url + path, json=body, headers=headers)


async def signup_login(srv, pki, username: str) -> dict:
    r = await https(srv, pki, "POST", "/v1/users", {"username": username, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = await https(srv, pki, "POST", "/v1/login", {"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return r.json()


async def tls_stream(port: int, ctx: ssl.SSLContext) -> trio.SSLStream:
    """A TLS connection to 127.0.0.1:port, handshake done (the peer certificate checked by ``ctx``)."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx, https_compatible=True)
    await stream.do_handshake()
    return stream


def peer_der(stream: trio.SSLStream) -> bytes:
    return stream.getpeercert(binary_form=True)


async def open_tls_client(nursery, ws_url: str, ctx: ssl.SSLContext, token: str) -> tuple[WSClient, trio.SSLStream]:
    """An authenticated WebSocket client over TLS (trio-websocket over our own TLS stream, kept
    to read the certificate it saw)."""
    assert ws_url.startswith("wss://127.0.0.1:"), ws_url
    stream = await tls_stream(port_of(ws_url), ctx)
    ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/", subprotocols=["chatd.v1.json"])
    client = WSClient(ws, "json")
    nursery.start_soon(client._pump)
    reply = await client.request({"type": "auth", "token": token})
    assert reply["type"] == "auth", reply
    return client, stream


# ---- the API and the WebSocket port over TLS ---------------------------------------------------
async def test_the_api_answers_over_https_and_login_names_a_wss_url(tls_server, pki):
    assert tls_server.info.api_url.startswith("https://127.0.0.1:")
    r = await https(tls_server, pki, "GET", "/healthz")
    assert r.status_code == 200
    login = await signup_login(tls_server, pki, "alice")
    assert login["ws_url"] == f"wss://127.0.0.1:{port_of(tls_server.ws_url)}/"
    assert tls_server.ws_url == login["ws_url"]


async def test_a_websocket_client_over_tls_authenticates_and_chats(tls_server, pki, nursery):
    alice = await signup_login(tls_server, pki, "alice")
    bob = await signup_login(tls_server, pki, "bob")
    ctx = pki.client_context()
    ca, stream_a = await open_tls_client(nursery, alice["ws_url"], ctx, alice["token"])
    cb, _ = await open_tls_client(nursery, bob["ws_url"], ctx, bob["token"])
    assert peer_der(stream_a) == pki.der
    ch = f"dm:{alice['user']['id']}:{bob['user']['id']}"
    ack = await ca.send_message(ch, "over tls")
    assert ack["type"] == "ack", ack
    [m] = await cb.messages(1)
    assert (m["channel_id"], m["body"]) == (ch, "over tls")


async def test_a_client_that_does_not_trust_the_ca_fails_the_handshake(tls_server, pki, nursery):
    untrusting = ssl.create_default_context()  # the system's CAs: not the test's
    for url in (tls_server.ws_url, tls_server.info.api_url):
        with pytest.raises(trio.BrokenResourceError) as info:
            await tls_stream(port_of(url), untrusting)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(verify=untrusting) as client:
            await client.get(tls_server.info.api_url + "/healthz")
    # a plain-text WebSocket client on the TLS port is not served either, and breaks nothing
    with trio.fail_after(10):
        s = await trio.open_tcp_stream("127.0.0.1", port_of(tls_server.ws_url))
        await s.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        while await s.receive_some(4096):  # TLS alert bytes at most, then the close
            pass
        await s.aclose()
    alice = await signup_login(tls_server, pki, "alice")  # the server goes on for the others
    client, _ = await open_tls_client(nursery, alice["ws_url"], pki.client_context(), alice["token"])
    assert (await client.request({"type": "heartbeat"}))["type"] == "heartbeat"


async def test_an_unfinished_tls_handshake_is_dropped_by_the_connect_deadline(nursery, tmp_path, pki, monkeypatch):
    monkeypatch.setattr(shard_server, "CONNECT_TIMEOUT_S", 0.5)
    srv = await RunningServer(nursery, tls_config(tmp_path, pki)).start()
    try:
        s = await trio.open_tcp_stream("127.0.0.1", port_of(srv.ws_url))
        with trio.fail_after(10):  # says nothing: the server hangs up when the deadline passes
            assert await s.receive_some(100) == b""
        await s.aclose()
    finally:
        await srv.stop()


# ---- reload ----------------------------------------------------------------------------------
async def test_reload_gives_new_connections_the_new_certificate_and_keeps_old_ones(tls_server, pki, nursery):
    alice = await signup_login(tls_server, pki, "alice")
    bob = await signup_login(tls_server, pki, "bob")
    ctx = pki.client_context()
    old_client, old_stream = await open_tls_client(nursery, alice["ws_url"], ctx, alice["token"])
    first = pki.der
    second = pki.issue()
    assert second != first
    ws_port, api_port = port_of(tls_server.ws_url), port_of(tls_server.info.api_url)
    before = await tls_stream(ws_port, ctx)
    assert peer_der(before) == first  # new files alone change nothing
    await before.aclose()

    assert tls_server.node.tls.reload() is True

    for port in (ws_port, api_port):
        s = await tls_stream(port, ctx)
        assert peer_der(s) == second
        await s.aclose()
    new_client, new_stream = await open_tls_client(nursery, bob["ws_url"], ctx, bob["token"])
    assert peer_der(new_stream) == second
    assert peer_der(old_stream) == first
    ch = f"dm:{alice['user']['id']}:{bob['user']['id']}"
    assert (await old_client.send_message(ch, "still here"))["type"] == "ack"  # the old connection goes on
    [m] = await new_client.messages(1)
    assert m["body"] == "still here"


async def test_a_failed_reload_keeps_the_certificate_in_use(tls_server, pki, caplog):
    pki.key_file.write_text("not a key\n")
    with caplog.at_level(logging.ERROR, logger="chatd.tls"):
        assert tls_server.node.tls.reload() is False
    [record] = [r for r in caplog.records if r.name == "chatd.tls"]
    assert record.levelno == logging.ERROR and "TLS reload failed" in record.getMessage()
    s = await tls_stream(port_of(tls_server.ws_url), pki.client_context())
    assert peer_der(s) == pki.der
    await s.aclose()
    pki.key_file.unlink()
    assert tls_server.node.tls.reload() is False
    assert (await https(tls_server, pki, "GET", "/healthz")).status_code == 200


async def test_sighup_reloads_the_certificate_of_a_running_chatd(tmp_path, pki):
    api_port, ws_port = free_port(), free_port()
    config = tmp_path / "chatd.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n'
                      f'[server]\napi_port = {api_port}\nws_port = {ws_port}\n'
                      f'tls_cert_file = "{pki.cert_file}"\ntls_key_file = "{pki.key_file}"\n'
                      "[auth]\nscrypt_n = 1024\n")
    log_path = tmp_path / "chatd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "chatd.cli", "run", "--config", str(config)],
                                stdout=log, stderr=log)
    ctx = pki.client_context()
    try:
        async def cert_seen():
            assert proc.poll() is None, log_path.read_text()
            try:
                s = await tls_stream(ws_port, ctx)
            except OSError:
                return None
            der = peer_der(s)
            await s.aclose()
            return der

        assert await eventually(cert_seen) == pki.der
        held = await tls_stream(api_port, ctx)  # an HTTPS connection opened before the reload
        assert peer_der(held) == pki.der
        second = pki.issue()
        proc.send_signal(signal.SIGHUP)
        await eventually(lambda: cert_seen_is(cert_seen, second))
        for port in (ws_port, api_port):
            s = await tls_stream(port, ctx)
            assert peer_der(s) == second
            await s.aclose()
        await held.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        with trio.fail_after(10):
            while chunk := await held.receive_some(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]  # it went on after the reload
        assert proc.poll() is None  # SIGHUP did not stop it
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 20) == 0
        assert "reloading the TLS certificate" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


async def cert_seen_is(cert_seen, der: bytes) -> bool:
    return await cert_seen() == der


# ---- warnings --------------------------------------------------------------------------------
async def test_a_listener_not_on_loopback_without_tls_is_warned_about(nursery, tmp_path, pki, caplog):
    caplog.set_level(logging.WARNING, logger="chatd.tls")
    cfg = make_config(tmp_path / "plain")
    cfg.update({"server": {"api_host": "0.0.0.0", "ws_host": "0.0.0.0"}}, source="test")
    srv = await RunningServer(nursery, cfg).start()  # (bound to every interface; never spoken to)
    await srv.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "chatd.tls" and r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("server.api_host = '0.0.0.0' is not loopback and the API has no TLS")
    assert warnings[1].startswith("server.ws_host = '0.0.0.0' is not loopback and the WebSocket port has no TLS")

    caplog.clear()
    srv = await RunningServer(nursery, tls_config(tmp_path / "tls", pki, api_host="0.0.0.0", ws_host="0.0.0.0")).start()
    await srv.stop()
    srv = await RunningServer(nursery, make_config(tmp_path / "loopback")).start()
    await srv.stop()
    assert [r for r in caplog.records if r.name == "chatd.tls"] == []


def test_the_warnings_name_each_listener_and_a_ws_public_url(pki):
    def warnings(**server):
        cfg = Config.from_mapping({"server": server})
        cfg.validate()
        return warn_plaintext(cfg, api=True, ws=True)

    assert warnings() == []
    assert warnings(api_host="::1", ws_host="localhost") == []
    assert len(warnings(api_host="192.0.2.7")) == 1
    assert len(warnings(ws_host="")) == 1  # every interface
    [w] = warnings(public_ws_url="ws://chat.example.com/ws")
    assert w.startswith("server.public_ws_url = 'ws://chat.example.com/ws' is ws:// on a host other than loopback")
    assert warnings(public_ws_url="wss://chat.example.com/ws") == []
    assert warnings(public_ws_url="ws://127.0.0.1:9000/") == []
    [w] = warnings(public_ws_url="ws://chat.example.com/ws", **pki.settings())  # TLS, but clients told ws://
    assert "public_ws_url" in w
    assert warnings(api_host="0.0.0.0", ws_host="0.0.0.0", **pki.settings()) == []


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback, ["", "0.0.0.0", "::", "10.0.0.1", "chat.example.com", "128.0.0.1"]))


async def test_an_explicit_public_ws_url_wins_over_wss(nursery, tmp_path, pki):
    srv = await RunningServer(nursery, tls_config(tmp_path, pki, public_ws_url="wss://chat.example.com/ws")).start()
    try:
        assert srv.ws_url == "wss://chat.example.com/ws"
    finally:
        await srv.stop()


# ---- configuration errors ---------------------------------------------------------------------
@pytest.mark.parametrize("server", [{"tls_cert_file": "/x/cert.pem"}, {"tls_key_file": "/x/key.pem"}])
def test_a_certificate_without_its_key_or_a_key_without_its_certificate_is_refused(server):
    with pytest.raises(ConfigError, match="server.tls_cert_file and server.tls_key_file go together"):
        Config.from_mapping({"server": server}).validate()


def test_unreadable_or_bad_files_are_a_clear_error_at_start_up(tmp_path, pki):
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=f"server.tls_cert_file: cannot read {missing}: No such file"):
        ServerTLS(str(missing), str(pki.key_file))
    with pytest.raises(ConfigError, match=f"server.tls_key_file: cannot read {missing}: No such file"):
        ServerTLS(str(pki.cert_file), str(missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="not a PEM certificate chain and its matching private key"):
        ServerTLS(str(garbage), str(pki.key_file))
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(pki.ca.issue_cert("localhost").private_key_pem.bytes())
    with pytest.raises(ConfigError, match="not a PEM certificate chain and its matching private key"):
        ServerTLS(str(pki.cert_file), str(other_key))


def test_chatd_run_refuses_to_start_with_an_unreadable_certificate(tmp_path):
    config = tmp_path / "chatd.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[server]\napi_port = {free_port()}\n'
                      f'ws_port = {free_port()}\ntls_cert_file = "{tmp_path}/nope.pem"\n'
                      f'tls_key_file = "{tmp_path}/nope-key.pem"\n[auth]\nscrypt_n = 1024\n')
    proc = subprocess.run([sys.executable, "-P", "-m", "chatd.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"Error: server.tls_cert_file: cannot read {tmp_path}/nope.pem: No such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_the_http_transports_answer_over_tls_too(tls_server, pki, nursery):
    """The shard port's SSE stream over TLS (docs/protocol.md section 7): login names an https://
    stream_url, and the stream carries what a WebSocket client sends."""
    import h11

    alice = await signup_login(tls_server, pki, "alice")
    bob = await signup_login(tls_server, pki, "bob")
    port = port_of(tls_server.ws_url)
    assert bob["stream_url"] == f"https://127.0.0.1:{port}/v1/stream"
    ctx = pki.client_context()
    stream = await tls_stream(port, ctx)
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(h11.Request(method="GET", target="/v1/stream", headers=[
        ("host", f"127.0.0.1:{port}"), ("authorization", f"Bearer {bob['token']}")])) + conn.send(h11.EndOfMessage()))
    body = b""

    async def until(needle: bytes):
        nonlocal body
        with trio.fail_after(10):
            while needle not in body:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(ev, h11.Response):
                    assert ev.status_code == 200
                elif isinstance(ev, h11.Data):
                    body += ev.data
    await until(b'"type":"ready"')
    ca, _ = await open_tls_client(nursery, alice["ws_url"], ctx, alice["token"])
    ack = await ca.send_message(f"dm:{alice['user']['id']}:{bob['user']['id']}", "over tls, to an SSE stream")
    assert ack["type"] == "ack", ack
    await until(b"over tls, to an SSE stream")
    await stream.aclose()


async def test_long_polling_and_posted_frames_over_tls(tls_server, pki):
    """``GET /v1/poll`` and ``POST /v1/frames`` on the shard port over TLS (docs/protocol.md 7.3,
    7.4): login names https:// URLs, a send posted over TLS is acked, the other side's poll over
    TLS returns it, and a plain-HTTP request to the TLS port gets no answer."""
    alice = await signup_login(tls_server, pki, "alice")
    bob = await signup_login(tls_server, pki, "bob")
    port = port_of(tls_server.ws_url)
    assert bob["poll_url"] == f"https://127.0.0.1:{port}/v1/poll"
    assert alice["frames_url"] == f"https://127.0.0.1:{port}/v1/frames"
    channel = f"dm:{alice['user']['id']}:{bob['user']['id']}"
    async with httpx.AsyncClient(verify=pki.client_context(), timeout=15) as http:
        def auth(who):
            return {"Authorization": f"Bearer {who['token']}"}
        first = await http.get(bob["poll_url"], params={"wait_s": 0}, headers=auth(bob))
        assert first.status_code == 200, first.text
        cursor = first.json()["cursor"]
        assert [e["type"] for e in first.json()["events"]][:1] == ["ready"], first.json()
        r = await http.post(alice["frames_url"], headers=auth(alice), json=[
            {"type": "send", "id": 1, "channel_id": channel, "client_msg_id": "tls-poll-1", "body": "posted over tls"}])
        assert r.status_code == 200, r.text
        (ack,) = r.json()["replies"]
        assert ack["type"] == "ack" and ack["client_msg_id"] == "tls-poll-1", ack
        got = []
        with trio.fail_after(15):
            while not any(e.get("body") == "posted over tls" for e in got):
                answer = await http.get(bob["poll_url"], params={"wait_s": 5, "cursor": cursor}, headers=auth(bob))
                assert answer.status_code == 200, answer.text
                cursor = answer.json()["cursor"]
                got += answer.json()["events"]
        (msg,) = [e for e in got if e.get("body") == "posted over tls"]
        assert msg["channel_id"] == channel and msg["seq"] == ack["seq"], msg
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port: no HTTP answer
        async with httpx.AsyncClient(timeout=5) as plain:
            await plain.get(f"http://127.0.0.1:{port}/v1/poll", headers={"Authorization": f"Bearer {bob['token']}"})
