"""``chatd bench media`` end to end against the ``chatd run`` it starts: uploads, attachments,
downloads by the other member, every sha256 checked (``--check`` fails the run on one corrupted or
failed request), and the report's figures present."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_media_runs_clean(tmp_path):
    out = subprocess.run([sys.executable, "-P", "-m", "chatd.cli", "bench", "media", "--clients", "2", "--group-size",
                          "2", "--duration", "2", "--media-size", "200000", "--json", "--check"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["ok"] and report["corrupted"] == 0 and report["uploads"] >= 2
    assert report["downloads"] == report["uploads"]  # one other member per group
    assert report["server_peak_rss_mib"] > 0 and report["server_cpu_s"] > 0
