"""schemathesis against a real ``chatd run`` process, from its own ``/openapi.json``: every
generated request (positive and negative, single calls and stateful chains, authenticated with a
real token) gets an answer that is not a 5xx and conforms to the spec (status, content type,
schema, headers). Afterwards the process still serves and what others stored is unchanged.

A short run (a fixed seed, ``CHATD_FUZZ_EXAMPLES`` cases per operation, 40 by default); a longer
one: ``CHATD_FUZZ_EXAMPLES=1000 CHATD_FUZZ_SEED=$RANDOM python -m pytest tests/test_api_fuzz.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import trio

from tests.helpers import ChatdRun as Proc
from tests.helpers import open_client


async def test_schemathesis_finds_nothing(tmp_path, nursery):
    p = Proc(tmp_path)
    # the fuzzer's many bad logins come from one address: the per-address login limiter (tested in
    # test_api.py) would answer the checks after the run with 429
    p.config.write_text(p.config.read_text().replace(
        "[auth]\n", "[auth]\nlogin_failures_per_ip_burst = 1000000\nlogin_failures_per_user_burst = 1000000\n"))
    await p.start()
    try:
        api = p.api
        alice, bob = await api.signup_login("alice"), await api.signup_login("bob")
        ch = f"dm:{alice['user']['id']}:{bob['user']['id']}"
        c = await open_client(nursery, alice["ws_url"], alice["token"])
        for i in range(5):
            await c.send_message(ch, f"before the fuzz {i}")

        async def history():
            r = await api.call("GET", f"/v1/channels/{ch}/messages", token=bob["token"])
            assert r.status == 200, r
            return r.body

        before = await history()
        fuzzer = await api.signup_login("fuzzer")
        st = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or "schemathesis"
        cmd = [st, "run", f"{api.base}/openapi.json", "--checks", "all", "--no-color",
               "-H", f"Authorization: Bearer {fuzzer['token']}",
               "-n", os.environ.get("CHATD_FUZZ_EXAMPLES", "40"), "--seed", os.environ.get("CHATD_FUZZ_SEED", "1"),
               "--workers", "2", "--generation-database", "none", "--request-timeout", "20",
               # logging out revokes the token the run authenticates with
               "--exclude-path", "/v1/logout"]
        result = await trio.run_process(cmd, capture_stdout=True, stderr=subprocess.STDOUT, check=False,
                                        cwd=tmp_path)
        out = result.stdout.decode(errors="replace")
        assert result.returncode == 0, out[-6000:]
        assert "No issues found" in out or " passed" in out, out[-3000:]
        # still healthy, nothing stored by others changed, still accepts writes
        assert p.proc.poll() is None
        assert (await api.call("GET", "/healthz")).status == 200
        assert await history() == before
        assert (await api.login("alice"))["user"]["id"] == alice["user"]["id"]
        await c.send_message(ch, "after the fuzz")
        assert [m["body"] for m in (await history())["messages"]][-1] == "after the fuzz"
        log = (tmp_path / "chatd.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-4000:]
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
