"""What an idle authenticated connection costs the shard, counted (issue 13: <= 16 KiB per idle
connection at 10,000; the bench measures bytes, this counts tasks, which do not depend on load).

The clients are plain blocking sockets driven by wsproto in a thread, so that every trio task
counted belongs to the server.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

N = 20


def count_tasks() -> int:
    n, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n


def _reply(sock: socket.socket, ws: WSConnection) -> dict:
    parts: list[str] = []
    while True:
        for event in ws.events():
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return json.loads("".join(parts))
            elif isinstance(event, CloseConnection):
                raise AssertionError(f"closed: {event.code} {event.reason}")
            else:
                raise AssertionError(f"unexpected {event!r}")
        data = sock.recv(65536)
        assert data, "connection closed"
        ws.receive_data(data)


def _request(sock, ws, frame: dict) -> dict:
    sock.sendall(ws.send(TextMessage(data=json.dumps(frame))))
    return _reply(sock, ws)


def open_idle(url: str, token: str, n: int) -> list:
    u = urlparse(url)
    conns = []
    for _ in range(n):
        sock = socket.create_connection((u.hostname, u.port), timeout=30)
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host=f"{u.hostname}:{u.port}", target="/")))
        while not any(isinstance(e, AcceptConnection) for e in ws.events()):
            data = sock.recv(65536)
            assert data, "connection closed during the handshake"
            ws.receive_data(data)
        assert _request(sock, ws, {"type": "auth", "id": 1, "token": token})["type"] == "auth"
        conns.append((sock, ws))
    return conns


def heartbeat_all(conns) -> None:
    for sock, ws in conns:
        assert _request(sock, ws, {"type": "heartbeat", "id": 2})["type"] == "heartbeat"


async def test_an_idle_authenticated_connection_costs_one_task(server):
    """One task per idle authenticated connection (its reader): no writer task, no timer task
    (auth timeout, token expiry), no WebSocket library task (plus at most a shared task or two
    the server starts meanwhile). Before issue 13 it was five."""
    alice = await server.api.signup_login("alice")
    await trio.sleep(0.2)
    before = count_tasks()
    conns = await trio.to_thread.run_sync(open_idle, alice["ws_url"], alice["token"], N)
    try:
        await trio.to_thread.run_sync(heartbeat_all, conns)  # they are served, not just held
        await trio.sleep(0.2)
        per_connection = (count_tasks() - before) / N
        assert per_connection < 1.5, f"{per_connection:.2f} tasks per idle authenticated connection"
    finally:
        for sock, _ in conns:
            sock.close()
    with trio.fail_after(10):  # and nothing is left behind when they go
        while count_tasks() > before:
            await trio.sleep(0.05)
    assert not server.node.shard.sessions
    assert len(server.node.shard.timers) == 0  # the closed sessions' timers went with them


def test_every_request_type_has_one_verb_and_only_verbs_that_wait_get_a_task():
    """chatd/shard/session.py's one dispatch table: every request the protocol parses has its
    method; the verbs that answer at once (or wait as backpressure on this client: a send's
    slot) run in the reader, the ones that wait on the store or a peer in a task of their own."""
    from chatd.protocol import client as proto
    from chatd.shard.session import VERBS, Session

    assert set(VERBS) == {cls for cls, _ in proto._SCHEMAS.values()}
    in_reader = {t.__name__ for t, (_, task) in VERBS.items() if not task}
    # (edit, delete, react, unreact: like a send, the reader takes the send slot, then a task waits)
    assert in_reader == {"Auth", "Send", "Sync", "Heartbeat", "UnsubscribePresence", "Edit", "Delete", "React",
                         "Unreact"}
    assert all(getattr(Session, method.__name__) is method for method, _ in VERBS.values())
