"""benchmarks/floor.py (the wire-work floor chatd's CPU per operation is compared against) runs and
does all of its wire work: every send acked, delivered to the partner / group and echoed (cluster-dm:
over a link between two of its three processes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FLOOR = Path(__file__).resolve().parent.parent / "benchmarks" / "floor.py"


@pytest.mark.parametrize("mode,extra", [("dm", []), ("group", ["--group-size", "5"]), ("cluster-dm", [])])
def test_floor_delivers_everything(mode, extra):
    out = subprocess.run([sys.executable, str(FLOOR), mode, "--clients", "10", "--rate", "100", "--duration", "1.5",
                          "--ramp-up", "0.3", "--json", *extra], capture_output=True, timeout=60, check=True)
    r = json.loads(out.stdout)["floor"]
    assert r["sent"] > 0
    assert r["acks"] == r["sent"]
    assert r["deliveries"] == r["expected_deliveries"] == r["sent"] * (5 if mode == "group" else 2)
    assert r["cpu_us_per_send"] > 0
    assert r["processes"] == (3 if mode == "cluster-dm" else 1)  # cluster-dm: partners on different processes
