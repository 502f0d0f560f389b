#!/usr/bin/env bash
# The multi-core run: `chatd run` (one server process) driven by a generator spread over many cores,
# so the generator never competes with the server. Used on the lent 16-core machine (no network
# there: dependencies travel as wheels in .whl/, see benchmarks/README.md). Writes JSON reports
# to $OUT (or ./bench-out).
set -u
OUT=${OUT:-./bench-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1
{ nproc; python3 --version; lscpu | grep -E "Model name|^CPU\(s\)"; } > "$OUT/machine.txt" 2>&1
run() {  # name, args...
  local name=$1; shift
  timeout 120 python3 -m chatd.cli bench "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err"
  python3 - "$OUT/$name.json" "$name" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(sys.argv[2], "no report:", e); sys.exit()
c, t, lat, srv = r["counts"], r["throughput"], r["latency_ms"], r.get("server", {})
sd = lat.get("send_deliver", {})
print(f"{sys.argv[2]}: ok={r['ok']} sent={c['sent']} acked={c['acked']} delivered={c['delivered']} "
      f"lost={c['lost']} dup={c['duplicated']} ooo={c['out_of_order']} deliv/s={t.get('delivered_per_s')} "
      f"p50={sd.get('p50')} p99={sd.get('p99')} max={sd.get('max')} server_cpu={srv.get('cpu_util')} "
      f"rss_kib={srv.get('rss_kib_before')}->{srv.get('rss_kib_max')} conns={r.get('connections')} "
      f"gen_saturated={r['generator'].get('saturated')} problems={r.get('problems')}")
PY
}
for R in 2000 3000 4000 5000; do
  run "dm_$R" dm --clients 400 --duration 12 --ramp-up 2 --rate $R --procs 6
done
for R in 40 60 80 100; do
  run "group_$R" group --clients 100 --group-size 100 --duration 12 --ramp-up 2 --rate $R --procs 6
done
run idle_10000 idle --clients 10000 --duration 20 --ramp-up 30 --procs 8
