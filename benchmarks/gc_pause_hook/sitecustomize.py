"""Diagnostics: log every cyclic-GC pass slower than 5 ms of the Python process this is loaded into.

Load it into a self-started server only::

    chatd bench idle --clients 4000 --server-env PYTHONPATH=benchmarks/gc_pause_hook \
        --server-env GC_PAUSE_LOG=/tmp/gc.log

Each line: ``pid unix_time gen<N> <pause>ms collected=<n>``. Not imported by chatd itself.
"""

import gc
import os
import time

_started = [0.0]
_log = open(os.environ.get("GC_PAUSE_LOG", "/tmp/chatd-gc-pauses.log"), "a", buffering=1)


def _on_gc(phase, info):
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    pause = time.perf_counter() - _started[0]
    if pause > 0.005:
        _log.write(f"{os.getpid()} {time.time():.3f} gen{info['generation']} {pause * 1000:.1f}ms "
                   f"collected={info['collected']}\n")


gc.callbacks.append(_on_gc)
