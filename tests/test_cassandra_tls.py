"""Issue 20: TLS from chatd to Cassandra (``cassandra.tls_*``). No Cassandra node with client
encryption here: the context the driver is given (``chatd.store.cql.ssl_context``) is checked on
its own and against a TLS server of the test's (a ``trustme`` CA, a server certificate, one that
requires a client certificate), and the driver is shown to use it: its connection attempt to that
server completes a verified TLS handshake that presents chatd's client certificate."""

from __future__ import annotations

import functools
import ssl

import pytest
import trio
import trustme

from chatd.config import CassandraConfig, Config, ConfigError
from chatd.store.cql import _connect_blocking, ssl_context

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("chatd-client")
    files = {}
    for name, blob in (("ca", ca.cert_pem), ("client_cert", client.cert_chain_pems[0]),
                       ("client_key", client.private_key_pem)):
        files[name] = tmp_path / f"{name}.pem"
        blob.write_to_path(str(files[name]))
    return ca, server, files


def cfg_with(files, **extra) -> CassandraConfig:
    return CassandraConfig(**{"tls_ca_file": str(files["ca"]), "tls_cert_file": str(files["client_cert"]),
                              "tls_key_file": str(files["client_key"]), **extra})


class TLSServer:
    """A TLS listener on 127.0.0.1 requiring a client certificate from the CA: it records the
    subject of each client that completed the handshake, then hangs up (it speaks no CQL)."""

    def __init__(self, ca: trustme.CA, cert: trustme.LeafCert):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ctx)
        ca.configure_trust(self.ctx)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.clients: list[tuple] = []  # the subjectAltName of each client certificate seen
        self.handshook = trio.Event()

    async def handle(self, stream):
        tls = trio.SSLStream(stream, self.ctx, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return
        self.clients.append(tls.getpeercert()["subjectAltName"])
        self.handshook.set()
        await tls.aclose()


async def serve(nursery, server: TLSServer) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


def test_no_ca_file_means_no_tls():
    assert ssl_context(CassandraConfig()) is None


def test_the_context_verifies_the_nodes(pki):
    _, _, files = pki
    ctx = ssl_context(cfg_with(files))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert ssl_context(cfg_with(files, tls_check_hostname=False)).check_hostname is False


async def test_a_handshake_with_the_context_presents_the_client_certificate(pki, nursery):
    ca, server_cert, files = pki
    server = TLSServer(ca, server_cert)
    port = await serve(nursery, server)
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ssl_context(cfg_with(files)))
    await stream.do_handshake()
    await server.handshook.wait()
    assert server.clients == [(("DNS", "chatd-client"),)]
    await stream.aclose()


async def test_a_node_certificate_from_another_ca_or_for_another_name_is_refused(pki, nursery):
    ca, _, files = pki
    for server in (TLSServer(ca, ca.issue_cert("db.example.com")), TLSServer(ca, trustme.CA().issue_cert("127.0.0.1"))):
        port = await serve(nursery, server)
        with pytest.raises(trio.BrokenResourceError) as info:
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ssl_context(cfg_with(files)))
            await stream.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    # with tls_check_hostname = false a certificate for another name from the CA passes
    server = TLSServer(ca, ca.issue_cert("db.example.com"))
    port = await serve(nursery, server)
    ctx = ssl_context(cfg_with(files, tls_check_hostname=False))
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx)
    await stream.do_handshake()
    await stream.aclose()


async def test_the_driver_connects_with_the_context(pki, nursery):
    ca, server_cert, files = pki
    server = TLSServer(ca, server_cert)
    port = await serve(nursery, server)
    cfg = cfg_with(files, contact_points="127.0.0.1", port=port, connect_timeout_s=2.0)
    with pytest.raises(Exception):  # noqa: B017 - the server speaks no CQL: the driver gives up
        await trio.to_thread.run_sync(_connect_blocking, cfg, None, ssl_context(cfg))
    assert server.clients and set(server.clients) == {(("DNS", "chatd-client"),)}


def test_bad_files_are_a_start_up_error_naming_the_setting(pki, tmp_path):
    _, _, files = pki
    with pytest.raises(ValueError, match="cassandra.tls_ca_file: cannot load"):
        ssl_context(CassandraConfig(tls_ca_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ValueError, match="cassandra.tls_cert_file / tls_key_file"):
        ssl_context(cfg_with(files, tls_key_file=str(files["ca"])))


@pytest.mark.parametrize("section, message", [
    ({"tls_ca_file": "/ca.pem", "tls_cert_file": "/c.pem"}, "go together"),
    ({"tls_ca_file": "/ca.pem", "tls_key_file": "/k.pem"}, "go together"),
    ({"tls_cert_file": "/c.pem", "tls_key_file": "/k.pem"}, "needs cassandra.tls_ca_file"),
])
def test_incomplete_settings_are_refused(section, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_mapping({"cassandra": section}).validate()
