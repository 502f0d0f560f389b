"""Issue 20: ``cluster.zk_auth`` puts digest ACLs on chatd's znodes. Against a real ZooKeeper (the
``zk`` fixture): a client that has not authenticated as chatd (or with another password) can
neither read, change, delete nor add to chatd's shard znodes, so nobody else can hand users a
``ws_url`` that receives their tokens; a root made open before zk_auth was set is given chatd's
ACL; without zk_auth the nodes stay open (the default); a real shard and API server work with it."""

from __future__ import annotations

import uuid

import pytest
import trio
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE

from chatd.cli import operator_error
from chatd.config import Config, ConfigError
from chatd.discovery.view import ShardInfo
from chatd.discovery.zk import ZkDiscovery, digest_acl
from tests.cluster import Cluster
from tests.helpers import open_client

pytestmark = pytest.mark.timeout(120)

AUTH = "chatd:zk-password-for-the-test-0123456789"


def kazoo(zk, auth: str | None = None) -> KazooClient:
    client = KazooClient(hosts=zk.hosts, auth_data=[("digest", auth)] if auth else None)
    client.start(timeout=10)
    return client


def attempts(zk, path: str, auth: str | None) -> dict:
    """What a client (``auth``: its digest, None: none) may do with chatd's znode ``path``:
    {operation: "ok" | "no auth"}."""
    client = kazoo(zk, auth)
    parent = path.rsplit("/", 1)[0]
    out = {}
    ops = {"read": lambda: client.get(path),
           "list": lambda: client.get_children(parent),
           "write": lambda: client.set(path, b'{"shard_id": "s1", "ws_url": "ws://evil.example/", "load": 0}'),
           "create": lambda: client.create(f"{parent}/evil", b"{}", ephemeral=True),
           "delete": lambda: client.delete(path)}
    try:
        for name in ("read", "list", "write", "create", "delete"):
            try:
                ops[name]()
                out[name] = "ok"
            except NoAuthError:
                out[name] = "no auth"
    finally:
        client.stop()
        client.close()
    return out


async def registered(zk, root: str, auth: str, nursery) -> ZkDiscovery:
    d = ZkDiscovery(zk.hosts, root, session_timeout_s=2.0, load_refresh_s=60.0, auth=auth)
    await nursery.start(d.run)
    await d.register(ShardInfo("s1", "ws://127.0.0.1:1/"), load=lambda: 0)
    return d


DENIED = {"read": "no auth", "list": "no auth", "write": "no auth", "create": "no auth", "delete": "no auth"}


async def test_only_chatd_can_read_or_write_its_znodes_with_zk_auth(zk, nursery):
    root = f"/chatd-acl-{uuid.uuid4().hex[:8]}"
    d = await registered(zk, root, AUTH, nursery)
    path = f"{root}/shards/s1"
    assert await trio.to_thread.run_sync(attempts, zk, path, None) == DENIED
    assert await trio.to_thread.run_sync(attempts, zk, path, "chatd:another-password") == DENIED
    assert d.writable and set(d.view.shards) == {"s1"}  # chatd's own znode is untouched
    # the same identity (another chatd process) may do all of it
    got = await trio.to_thread.run_sync(attempts, zk, path, AUTH)
    assert got == {"read": "ok", "list": "ok", "write": "ok", "create": "ok", "delete": "ok"}


async def test_a_root_made_open_before_zk_auth_gets_chatds_acl(zk, nursery):
    root = f"/chatd-acl-{uuid.uuid4().hex[:8]}"

    def make_open():
        client = kazoo(zk)
        client.ensure_path(f"{root}/shards")  # world:anyone, all permissions
        acl, _ = client.get_acls(f"{root}/shards")
        client.stop()
        client.close()
        return acl
    assert await trio.to_thread.run_sync(make_open) == OPEN_ACL_UNSAFE
    await registered(zk, root, AUTH, nursery)
    assert await trio.to_thread.run_sync(attempts, zk, f"{root}/shards/s1", None) == DENIED


async def test_without_zk_auth_the_znodes_are_open(zk, nursery):
    root = f"/chatd-acl-{uuid.uuid4().hex[:8]}"
    await registered(zk, root, "", nursery)
    got = await trio.to_thread.run_sync(attempts, zk, f"{root}/shards/s1", None)
    assert got == {"read": "ok", "list": "ok", "write": "ok", "create": "ok", "delete": "ok"}


@pytest.mark.parametrize("value", ["chatd", "chatd:", ":password"])
def test_zk_auth_must_be_user_colon_password(value):
    with pytest.raises(ConfigError, match='cluster.zk_auth must be "user:password"'):
        Config.from_mapping({"cluster": {"zk_auth": value}}).validate()


async def test_a_cluster_with_zk_auth_serves_logins_and_chat(zk, tmp_path, nursery):
    cluster = Cluster(zk, tmp_path, n=1, extra=f'zk_auth = "{AUTH}"\n')
    try:
        await cluster.start()
        a = await cluster.api.signup_login("alice")
        b = await cluster.api.signup_login("bob")
        assert a["ws_url"] == cluster.ws_url("s1")
        ca = await open_client(nursery, a["ws_url"], a["token"])
        cb = await open_client(nursery, b["ws_url"], b["token"])
        ch = f"dm:{a['user']['id']}:{b['user']['id']}"
        assert (await ca.send_message(ch, "acl'd"))["type"] == "ack"
        assert (await cb.messages(1))[0]["body"] == "acl'd"
        assert await trio.to_thread.run_sync(attempts, zk, f"{cluster.root}/shards/s1", None) == DENIED
    finally:
        cluster.stop()


async def test_a_root_held_by_another_identity_is_a_start_up_error(zk):
    root = f"/chatd-acl-{uuid.uuid4().hex[:8]}"

    def make_theirs():
        other = "someone:else-entirely"
        client = kazoo(zk, other)
        client.ensure_path(f"{root}/shards", acl=digest_acl(other))
        client.stop()
        client.close()
    await trio.to_thread.run_sync(make_theirs)
    d = ZkDiscovery(zk.hosts, root, session_timeout_s=2.0, load_refresh_s=60.0, auth=AUTH)
    with pytest.raises(BaseException) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
    # what `chatd shard` prints (chatd/cli.py), one line
    assert operator_error(info.value) == (f"ZooKeeper node {root} has an ACL that does not let cluster.zk_auth's "
                                          "identity change it; set its ACL (zkCli setAcl) or remove it")
