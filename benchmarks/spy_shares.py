"""Shares of a py-spy raw profile (``py-spy record -f raw``): inclusive and self, per function,
over the busy samples of all threads (idle frames -- waits in epoll, thread-pool waits -- apart).

    python benchmarks/spy_shares.py out.raw [N]
"""

import collections
import sys

# leaf frames that are waits, not work: trio's epoll wait, idle thread-cache workers, the SQLite
# writer thread waiting for its queue
IDLE = ("EpollIOManager.get_events (", "WorkerThread._work (", "SQLiteStore._drain (", "SQLiteStore._gather (",
        "_wait_for_tstate_lock (", "Condition.wait (")


def main(path: str, top: int = 45) -> None:
    incl = collections.Counter()
    own = collections.Counter()
    total = busy = 0
    for line in open(path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        if any(k in leaf for k in IDLE):
            continue
        busy += n
        own[_name(leaf)] += n
        for f in set(_name(x) for x in frames[1:]):
            incl[f] += n
    print(f"{total} samples, {busy} busy ({busy / max(1, total):.0%})")
    print("\ninclusive (% of busy):")
    for f, n in incl.most_common(top):
        print(f"  {n / busy:6.1%}  {f}")
    print("\nself (% of busy):")
    for f, n in own.most_common(top):
        print(f"  {n / busy:6.1%}  {f}")


def _name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    fn, _, rest = frame.partition(" (")
    return f"{fn} ({rest.rsplit('/', 1)[-1].split(':')[0]})"


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
