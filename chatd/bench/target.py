"""Where the load goes: a deployment given by its API URL, or a ``chatd run`` the bench starts.

:class:`LocalServer` owns a child process: ``start`` picks two free loopback ports and a temporary
data directory, starts ``python -P -m chatd.cli run`` with the bench's environment overrides
(``-P``: chatd is imported from the installed package or ``PYTHONPATH``, never from the current
directory, which ``-m`` would otherwise put first -- a benchmark of another checkout would measure
the wrong code), and returns once ``/healthz`` answers (or raises
:class:`TargetError` with the tail of the server's log).
``stop`` sends SIGTERM (graceful drain), then SIGKILL after a deadline, and removes the data
directory unless asked to keep it. :func:`rss_kib` reads a local process's resident memory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# What makes a self-started server usable for load (see ``chatd bench --help``).
SERVER_ENV_DEFAULTS = {
    "CHATD_LIMITS__RATE_FRAMES_PER_S": "1000000",
    "CHATD_LIMITS__RATE_BURST": "1000000",
    "CHATD_LIMITS__FLOOD_CLOSE_AFTER": "1000000000",
    "CHATD_AUTH__SCRYPT_N": "1024",  # throwaway bench users: a cheap password hash
    "CHATD_AUTH__SIGNUPS_UNTHROTTLED": "127.0.0.0/8",  # the bench signs its users up from this host
    "CHATD_LIMITS__MAX_CONNECTIONS_PER_ADDRESS": "0",  # every bench client comes from this host
}


class TargetError(RuntimeError):
    pass


def server_opt_env(opt: str) -> tuple[str, str]:
    """``store.sqlite_synchronous=normal`` -> ``("CHATD_STORE__SQLITE_SYNCHRONOUS", "normal")``;
    a top-level key (``log_level=warning``) -> ``CHATD__LOG_LEVEL``."""
    key, sep, value = opt.partition("=")
    if not sep or not key:
        raise ValueError(f"--server-opt {opt!r}: expected SECTION.KEY=VALUE")
    parts = key.strip().split(".")
    if len(parts) == 1:
        return f"CHATD__{parts[0].upper()}", value
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--server-opt {opt!r}: expected SECTION.KEY=VALUE")
    return f"CHATD_{parts[0].upper()}__{parts[1].upper()}", value


def server_env_pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--server-env {item!r}: expected KEY=VALUE")
    return key, value


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a local process has used (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _free_ports(n: int, host: str) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_healthy(api_url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TargetError(f"the server exited with status {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(api_url + "/healthz", timeout=2) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = e
        time.sleep(0.1)
    raise TargetError(f"{api_url}/healthz did not answer within {timeout_s:.0f} s ({last})")


class LocalServer:
    def __init__(self, env_overrides: dict[str, str], host: str = "127.0.0.1", keep_data: bool = False,
                 data_dir: str | None = None):
        self.env_overrides = env_overrides
        self.host = host
        self.keep_data = keep_data
        self._given_dir = data_dir
        self.data_dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.api_url: str | None = None
        self.log_path: Path | None = None
        self._log = None
        self.final_log_tail = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = 30.0) -> str:
        self.data_dir = Path(self._given_dir or tempfile.mkdtemp(prefix="chatd-bench-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "server.log"
        env = dict(os.environ)
        env.update(self.env_overrides)
        for attempt in range(3):  # a picked port can be taken before the server binds it
            api_port, ws_port = _free_ports(2, self.host)
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "chatd.cli", "run", "--data-dir", str(self.data_dir / "data"),
                 "--api-port", str(api_port), "--ws-port", str(ws_port), "--host", self.host],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env)
            self.api_url = f"http://{self.host}:{api_port}"
            try:
                wait_healthy(self.api_url, timeout_s, self.proc)
                return self.api_url
            except TargetError as e:
                self._kill()
                if attempt == 2 or "Address already in use" not in self.log_tail():
                    raise TargetError(f"{e}\n--- server log ({self.log_path}) ---\n{self.log_tail()}") from None
        raise AssertionError("unreachable")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after ``timeout_s``; the exit status."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        self.final_log_tail = self.log_tail() if self.log_path else ""
        if self._log:
            self._log.close()
            self._log = None
        if self.data_dir is not None and not self.keep_data and self._given_dir is None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return code
