"""``chatd bench``: click parses, :func:`chatd.bench.runner.run_bench` runs, the report prints."""

from __future__ import annotations

import json
import sys

import click

from .scenarios import SCENARIOS, BenchOptions, auto_procs, parse_mix
from .target import SERVER_ENV_DEFAULTS, server_env_pair, server_opt_env

HELP = """Load-test chatd and check that no message is lost, duplicated or reordered.

\b
SCENARIO is one of:
  dm      1:1 pairs; every client sends to its partner (--clients must be even).
  group   groups of --group-size members (2..1000); every member sends to its group.
  storm   1:1 pairs that keep sending while every client disconnects (half abruptly,
          half with a close frame) about every --reconnect-interval seconds, stays away
          up to --offline seconds, and reconnects with auth + cursors; it must get all it
          missed exactly once, and its un-acked sends are resent with the same client_msg_id.
  idle    hold --clients x --devices connections that only heartbeat; with a local server
          (self-started, or --server-pid) report its RSS per connection.
  failover  faults under load against bin/chatd-local-cluster (--cluster-dir, --api):
          --faults kill:s1,freeze:s2,zk (kill -9 + restart, SIGSTOP for --freeze seconds,
          ZooKeeper kill -9 + restart after --zk-down seconds); reports per fault the time
          to the first ack by the new owner, sends answered unavailable, sends answered
          later than --answer-bound or never (must be 0), duplicated / out-of-order /
          lost deliveries (must be 0). Uses --clients, --rate, --seed, --json, --check.

\b
Target: --api URL of a running deployment, or by default a `chatd run` that bench starts
itself (free loopback ports, temporary data dir, stopped with SIGTERM at the end) with:
  CHATD_LIMITS__RATE_FRAMES_PER_S=1000000, CHATD_LIMITS__RATE_BURST=1000000,
  CHATD_LIMITS__FLOOD_CLOSE_AFTER=1000000000 (no per-connection rate limit),
  CHATD_AUTH__SCRYPT_N=1024 (a cheap password hash for the throwaway bench users;
  a deployment with the default 2**15 makes setup slow). Everything else keeps its
  default, e.g. store.sqlite_synchronous=full (fsync per group commit); change it
  with --server-opt store.sqlite_synchronous=normal.

\b
Each client is a user (named b<seed>-<random>-<n>, unique per run) with --devices
logins; each device is one WebSocket. Sends follow an open-loop schedule: --rate is
the TOTAL messages per second over all sending devices (each gets rate/devices),
rising linearly from 0 over --ramp-up. Latencies count from the scheduled send
time: send -> ack on the sending device; send -> deliver from the wall-clock send
time carried in the body to the arrival at each OTHER device (live messages only;
the sender's own echo and sync catch-up are counted as delivered, not timed).
Throughput is the mean per second over the whole seconds after the ramp-up.

\b
Measures: sent, acked, delivered (per device), expected deliveries, lost (acked but
missing on some member device after the drain), duplicated (a (channel, seq) twice on
one device), out of order (a seq below one already seen), latency percentiles
p50/p90/p99/p99.9/max from a log-bucketed histogram merged over processes, errors
by code, unexpected closes, connection failures, generator CPU per process (flagged
SATURATED above 90% of a core: add --procs).

\b
Examples:
  chatd bench dm --clients 200 --rate 2000 --duration 20 --plot dm.svg
  chatd bench group --clients 100 --group-size 100 --rate 100 --json > group.json
  chatd bench storm --clients 100 --rate 500 --reconnect-interval 0.5
  chatd bench idle --clients 10000 --duration 20 --procs 2
  chatd bench dm --api http://chat.example:8080 --clients 1000 --rate 5000
"""


def _procs(value):
    if value in (None, "auto"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter("must be a number or 'auto'") from None
    if n < 1:
        raise click.BadParameter("must be >= 1")
    return n


def _mix(text: str) -> tuple:
    try:
        return parse_mix(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected op=weight,... (send, edit, delete, react)", param_hint="--mix")


@click.command(help=HELP, context_settings={"max_content_width": 100})
@click.argument("scenario", type=click.Choice(sorted(SCENARIOS) + ["failover", "media"]))
@click.option("--clients", type=int, default=100, show_default=True,
              help="Users taking part (each with --devices connections).")
@click.option("--devices", type=int, default=1, show_default=True,
              help="Logins (devices, WebSocket connections) per user; every device of every member receives.")
@click.option("--rate", type=float, default=1000.0, show_default=True,
              help="TOTAL messages sent per second over all devices (dm, group, storm).")
@click.option("--duration", "duration_s", type=float, default=10.0, show_default=True,
              help="Seconds of load (idle: seconds to hold the connections).")
@click.option("--size", type=int, default=64, show_default=True,
              help="Message body length in characters (>= 17; it starts with a 16-hex-digit send timestamp).")
@click.option("--ramp-up", "ramp_up_s", type=float, default=0.0, show_default=True,
              help="Seconds over which the send rate rises linearly from 0 to --rate "
                   "(idle: over which the connections are opened).")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seed of the run's randomness (send order, storm timing, user names' prefix).")
@click.option("--procs", default="auto", show_default=True,
              help="Generator processes, each with its own trio loop; 'auto' = one per 500 connections, "
                   "at most one per CPU.")
@click.option("--format", "fmt", type=click.Choice(["json", "msgpack"]), default="json", show_default=True,
              help="Wire format (WebSocket subprotocol chatd.v1.json or chatd.v1.msgpack).")
@click.option("--transport", type=click.Choice(["ws", "sse", "poll"]), default="ws", show_default=True,
              help="How devices connect: WebSocket, SSE + POST /v1/frames, or long polling + POST /v1/frames "
                   "(docs/protocol.md section 7); the same loss / duplicate / order checks.")
@click.option("--group-size", type=int, default=10, show_default=True,
              help="group: members per group (2..1000); --clients must be a multiple, or smaller.")
@click.option("--reconnect-interval", "reconnect_interval_s", type=float, default=1.0, show_default=True,
              help="storm: mean seconds a client stays connected between drops (uniform 0.5x..1.5x).")
@click.option("--offline", "offline_s", type=float, default=0.3, show_default=True,
              help="storm: a dropped client stays away a uniform 0..OFFLINE seconds.")
@click.option("--drain", "drain_s", type=float, default=5.0, show_default=True,
              help="At the end, wait at most this long for outstanding acks, then as long again for "
                   "deliveries (it stops as soon as everything arrived); what is missing then is lost.")
@click.option("--max-inflight", type=int, default=64, show_default=True,
              help="Sends in flight per connection (the protocol allows 64).")
@click.option("--connect-concurrency", type=int, default=64, show_default=True,
              help="TCP+WebSocket handshakes in progress at once, per generator process.")
@click.option("--connect-timeout", "connect_timeout_s", type=float, default=15.0, show_default=True,
              help="Seconds one TCP+WebSocket handshake may take before the client gives up and retries.")
@click.option("--mix", "mix_text", default="", metavar="send=80,edit=5,delete=5,react=10",
              help="dm, group: the message lifecycle in the load: weights of send, edit (an own message), "
                   "delete (an own message), react (react / unreact in turn, on an own message). Every device "
                   "folds what it receives; at the end each device's folded view must equal the folded HTTP "
                   "history (reported as 'lifecycle': converged).")
@click.option("--api", help="API URL of a running deployment (default: start a `chatd run` locally).")
@click.option("--server-pid", type=int, multiple=True,
              help="With --api on this machine: a server process's pid, to sample its RSS and CPU time "
                   "(/proc); repeatable: the figures are summed over all (and listed per process).")
@click.option("--server-opt", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Self-started server: a config override, passed as CHATD_SECTION__KEY=VALUE "
                   "(e.g. store.sqlite_synchronous=normal). Repeatable.")
@click.option("--server-env", multiple=True, metavar="KEY=VALUE",
              help="Self-started server: an extra environment variable, as is. Repeatable.")
@click.option("--keep-data", is_flag=True, help="Self-started server: keep its temporary data dir and log.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON on stdout (the summary table goes to stderr).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              help="Write an SVG: latency by percentile and messages per second over time.")
@click.option("--check", is_flag=True, help="Exit with status 1 if anything was lost, duplicated, out of "
                                            "order or never acked (for CI).")
@click.option("--progress/--no-progress", default=None,
              help="Live one-line progress on stderr [default: only when stderr is a terminal].")
@click.option("--cluster-dir",
              help="The CLUSTER_DIR of bin/chatd-local-cluster (its run/*.pid files). failover: the cluster to "
                   "fault [default: ./local-cluster]. dm, group, storm, idle (with --api): its chatd processes "
                   "(shards, presence, API; not ZooKeeper) are the servers whose CPU and RSS are summed.")
@click.option("--cross-shard", is_flag=True,
              help="dm, storm: pair users whose logins named different shards (as far as the shards' shares "
                   "allow); the report's 'cluster' section says what share of sends crossed shards.")
@click.option("--faults", default="kill:s1,freeze:s2,zk", show_default=True,
              help="failover: comma-separated faults, applied one at a time: kill:SHARD, freeze:SHARD, zk.")
@click.option("--freeze", "freeze_s", type=float, default=6.0, show_default=True,
              help="failover: seconds a frozen shard stays stopped (longer than the ZooKeeper session: a zombie).")
@click.option("--zk-down", "zk_down_s", type=float, default=5.0, show_default=True,
              help="failover: seconds ZooKeeper stays down.")
@click.option("--answer-bound", "answer_bound_s", type=float, default=2.5, show_default=True,
              help="failover: a send answered later than this is a failure (limits.send_answer_s = 2 s, "
                   "plus the client's share).")
@click.option("--media-size", type=int, default=1024 * 1024, show_default=True,
              help="media: bytes per uploaded file.")
@click.option("--image-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="media: share of uploads that are JPEG photos (re-encoded and thumbnailed); the rest random bytes.")
def bench(scenario, clients, devices, rate, duration_s, size, ramp_up_s, seed, procs, fmt, group_size,
          transport, reconnect_interval_s, offline_s, drain_s, max_inflight, connect_concurrency, connect_timeout_s, api,
          server_pid, server_opt, server_env, keep_data, as_json, plot_path, check, progress, cluster_dir,
          cross_shard, faults, freeze_s, zk_down_s, answer_bound_s, mix_text, media_size, image_share):
    if scenario == "media":
        _media(api, server_pid, clients, group_size, duration_s, media_size, image_share, as_json, check, keep_data)
        return
    if scenario == "failover":
        _failover(api, cluster_dir or "./local-cluster", faults, clients, rate, seed, freeze_s, zk_down_s, answer_bound_s, as_json, check)
        return
    from .runner import BenchError, Display, TargetOptions, run_bench
    from .worker import raise_nofile_limit

    n_procs = _procs(procs)
    opts = BenchOptions(scenario=scenario, clients=clients, devices=devices, rate=rate, duration_s=duration_s,
                        size=size, ramp_up_s=ramp_up_s, seed=seed,
                        procs=n_procs or auto_procs(clients * devices), fmt=fmt, group_size=group_size,
                        drain_s=drain_s, reconnect_interval_s=reconnect_interval_s, offline_s=offline_s,
                        connect_concurrency=connect_concurrency, connect_timeout_s=connect_timeout_s,
                        max_inflight=max_inflight, cross_shard=cross_shard, mix=_mix(mix_text),
                        transport=transport)
    try:
        opts.validate()
        pids = {}
        if cluster_dir:
            from .topology import cluster_pids

            pids.update(cluster_pids(cluster_dir))
        pids.update((str(p) if len(server_pid) > 1 or pids else "server", p) for p in server_pid)
        env = dict(SERVER_ENV_DEFAULTS)
        env.update(server_opt_env(o) for o in server_opt)
        env.update(server_env_pair(e) for e in server_env)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if (server_pid or cluster_dir) and not api:
        raise click.UsageError("--server-pid and --cluster-dir need --api (a self-started server is measured anyway)")
    if api and (server_opt or server_env or keep_data):
        raise click.UsageError("--server-opt, --server-env and --keep-data apply to a self-started server only")
    raise_nofile_limit()  # for our sockets, and inherited by a self-started server
    topts = TargetOptions(api=api, server_env=env, server_pids=pids, keep_data=keep_data)
    try:
        report, hists = run_bench(opts, topts, Display(progress))
    except BenchError as e:
        raise click.ClickException(str(e)) from None
    from .report import format_summary

    summary = format_summary(report)
    if as_json:
        click.echo(summary, err=True)
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(summary)
    if plot_path:
        from .plot import write_svg

        write_svg(plot_path, report, hists)
        click.echo(f"plot written to {plot_path}", err=True)
    if check and not report["ok"]:
        sys.exit(1)


def _media(api, server_pids, clients, group_size, duration_s, media_size, image_share, as_json, check, keep_data):
    import trio

    from .media import MediaOptions, format_report, run_media
    from .target import SERVER_ENV_DEFAULTS, LocalServer, TargetError

    server = None
    if api is None:
        server = LocalServer({**SERVER_ENV_DEFAULTS, "CHATD_MEDIA__UPLOADS_PER_HOUR": "1000000",
                              "CHATD_MEDIA__BYTES_PER_HOUR": str(1 << 50)}, keep_data=keep_data)
        try:
            api = server.start()
        except TargetError as e:
            raise click.ClickException(str(e)) from None
        server_pids = (server.pid,)
    try:
        opts = MediaOptions(api=api, clients=clients, group_size=max(2, min(group_size, clients)),
                            duration_s=duration_s, media_size=media_size, image_share=image_share,
                            server_pids=tuple(server_pids))
        report = trio.run(run_media, opts, lambda line: click.echo(line, err=True))
    finally:
        if server is not None:
            server.stop()
    summary = format_report(report)
    if as_json:
        click.echo(summary, err=True)
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(summary)
    if check and not report["ok"]:
        sys.exit(1)


def _failover(api, cluster_dir, faults, clients, rate, seed, freeze_s, zk_down_s, answer_bound_s, as_json, check):
    from .failover import FailoverError, FailoverOptions, format_report, run_failover

    opts = FailoverOptions(api=api or "http://127.0.0.1:8080", cluster_dir=cluster_dir,
                           faults=tuple(f.strip() for f in faults.split(",") if f.strip()), clients=clients,
                           rate=rate, seed=seed, freeze_s=freeze_s, zk_down_s=zk_down_s,
                           answer_bound_s=answer_bound_s)
    if clients < 4 or rate <= 0:
        raise click.UsageError("failover needs --clients >= 4 and --rate > 0")
    try:
        report = run_failover(opts, log=lambda line: click.echo(line, err=True))
    except FailoverError as e:
        raise click.ClickException(str(e)) from None
    summary = format_report(report)
    if as_json:
        click.echo(summary, err=True)
        click.echo(json.dumps(report, indent=2, default=list))
    else:
        click.echo(summary)
    if check and not report["ok"]:
        sys.exit(1)
