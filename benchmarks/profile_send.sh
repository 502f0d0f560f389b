#!/bin/sh
# Profile the server of a `chatd bench` run with py-spy (pip install py-spy): waits until the
# generator is sending, records 10 s of it, then prints inclusive/self shares.
#   benchmarks/profile_send.sh OUT_DIR chatd bench dm --clients 200 --rate 1000 --duration 15 --procs 1
set -e
out=$1; shift
mkdir -p "$out"
"$@" --json > "$out/bench.json" &
bench=$!
pid=""
while [ -z "$pid" ]; do sleep 0.5; pid=$(pgrep -P "$bench" -f "chatd.cli run --data-dir" | head -1); done
# wait for the send phase: the generator processes are up (after the users' set-up), then
# 3 s for their connects and the first sends
while ! pgrep -P "$bench" -f spawn_main > /dev/null; do sleep 0.5; done
sleep 3
py-spy record --pid "$pid" -d 10 -f raw -o "$out/out.raw" ${SPY_OPTS:---idle} -r 200 > "$out/py-spy.log" 2>&1 || true
wait $bench || true
python "$(dirname "$0")/spy_shares.py" "$out/out.raw" > "$out/shares.txt"
head -60 "$out/shares.txt"
