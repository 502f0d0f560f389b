"""Reproduction (found by `chatd bench idle --clients 10000`): a client that resets its TCP
connection after sending the WebSocket upgrade request, before the server's 101 reply, makes
`chatd run` exit with status 1.

Cause: ``ShardServer._handle`` (chatd/shard/server.py) awaits ``request.accept()`` outside any
``try``; trio-websocket raises ``ConnectionClosed`` when writing the 101 fails, the exception leaves
the handler, and the handler nursery of ``serve_websocket`` takes the whole shard (and process) down.
Clients do this for real when their connect timeout fires, or when they are killed.

Fixed in 242548f (the shard survives such clients); kept as a regression check.
Run: ``python benchmarks/repro_handshake_reset.py`` (before the fix: "server alive ...: False" and
exit status 1; now: "True", exit status 0).
"""

import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main() -> int:
    api, ws = free_port(), free_port()
    srv = subprocess.Popen([sys.executable, "-P", "-m", "chatd.cli", "run", "--data-dir", tempfile.mkdtemp(),
                            "--api-port", str(api), "--ws-port", str(ws), "--host", "127.0.0.1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{api}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{ws}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    for _ in range(20):
        c = socket.create_connection(("127.0.0.1", ws))
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        c.sendall(request)
        c.close()  # gone before the 101
    time.sleep(1)
    alive = srv.poll() is None
    print("server alive after 20 reset handshakes:", alive)
    if alive:
        srv.send_signal(signal.SIGTERM)
    code = srv.wait(15)
    print("server exit status:", code)
    if code:
        print(srv.stderr.read().decode()[-2500:])
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
