"""Setting the stage over the HTTP API: the run's users, their devices' logins and the groups.

Users get a run-unique name prefix (``b<seed>-<random>-``), so runs against a long-lived deployment
never collide. Calls go out over a few keep-alive connections at once; any non-2xx answer stops the
run with :class:`SetupError` naming the call.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import trio

from ..ids import dm_channel_id
from .httpclient import HTTPClient
from .scenarios import BenchOptions, DeviceSpec, plan_channels
from .topology import cross_shard_order

HTTP_CONCURRENCY = 16


class SetupError(RuntimeError):
    pass


@dataclass
class Population:
    prefix: str
    user_ids: list[int]
    devices: list[DeviceSpec]
    channel_devices: dict[str, list[int]]  # channel id -> indices of its members' devices
    http_calls: int = 0
    shards: list[str] = field(default_factory=list)  # live shards at setup (the API's /healthz)


def run_prefix(seed: int) -> str:
    return f"b{seed % 1_000_000}-{secrets.token_hex(3)}-"


def _check(status: int, body, what: str, ok=(200, 201)) -> dict:
    if status not in ok:
        raise SetupError(f"{what}: HTTP {status}: {body}")
    return body


async def populate(api_url: str, opts: BenchOptions, progress=None, shards: list[str] | None = None) -> Population:
    """Create ``opts.clients`` users, log each in ``opts.devices`` times, create the groups;
    with ``opts.cross_shard``, pair users on different shards (:func:`cross_shard_order`)."""
    prefix = run_prefix(opts.seed)
    password = "bench-" + secrets.token_hex(8)
    n = opts.clients
    user_ids = [0] * n
    logins: list[list[dict]] = [[] for _ in range(n)]
    done = [0]
    total_calls = n * (1 + opts.devices)

    def tick(k=1):
        done[0] += k
        if progress:
            progress(f"setup: {done[0]}/{total_calls} HTTP calls")

    async def make_user(client: HTTPClient, i: int) -> None:
        name = f"{prefix}{i}"
        status, body = await client.request("POST", "/v1/users", {"username": name, "password": password})
        _check(status, body, f"POST /v1/users {name}", ok=(201,))
        tick()
        for _ in range(opts.devices):
            status, body = await client.request("POST", "/v1/login", {"username": name, "password": password})
            _check(status, body, f"POST /v1/login {name}")
            logins[i].append(body)
            tick()
        user_ids[i] = logins[i][0]["user"]["id"]

    await _run_pool(api_url, list(range(n)), make_user)
    if opts.cross_shard:
        order = cross_shard_order([lg[0].get("shard_id", "") for lg in logins])
        user_ids, logins = [user_ids[i] for i in order], [logins[i] for i in order]

    plans = plan_channels(opts.scenario, n, opts.group_size)
    channel_ids: list[str] = [""] * len(plans)

    async def make_channel(client: HTTPClient, k: int) -> None:
        plan = plans[k]
        if plan.kind == "dm":
            channel_ids[k] = dm_channel_id(user_ids[plan.members[0]], user_ids[plan.members[1]])
            return
        owner = plan.members[0]
        status, body = await client.request(
            "POST", "/v1/groups", {"name": f"{prefix}g{k}", "members": [user_ids[m] for m in plan.members[1:]]},
            token=logins[owner][0]["token"])
        channel_ids[k] = _check(status, body, "POST /v1/groups", ok=(201,))["channel"]["id"]
        if progress:
            progress(f"setup: group {k + 1}/{len(plans)}")

    await _run_pool(api_url, list(range(len(plans))), make_channel)

    channel_of_user: dict[int, str] = {}
    for k, plan in enumerate(plans):
        for m in plan.members:
            channel_of_user[m] = channel_ids[k]
    devices: list[DeviceSpec] = []
    channel_devices: dict[str, list[int]] = {c: [] for c in channel_ids}
    for i in range(n):
        for j, login in enumerate(logins[i]):
            idx = len(devices)
            ch = channel_of_user.get(i)
            devices.append(DeviceSpec(index=idx, user_index=i, user_id=user_ids[i], token=login["token"],
                                      ws_url=login["ws_url"], tag=f"{prefix}{idx}.",
                                      channels=(ch,) if ch else (), send_channel=ch,
                                      shard=login.get("shard_id") or ""))
            if ch:
                channel_devices[ch].append(idx)
    return Population(prefix, user_ids, devices, channel_devices, http_calls=total_calls + len(plans),
                      shards=list(shards or []))


async def _run_pool(api_url: str, jobs: list, fn) -> None:
    if not jobs:
        return
    send, recv = trio.open_memory_channel(len(jobs))
    for job in jobs:
        send.send_nowait(job)
    send.close()

    failures: list[Exception] = []

    async def lane(cancel_scope):
        client = HTTPClient(api_url)
        try:
            async for job in recv:
                await fn(client, job)
        except (SetupError, OSError, trio.TooSlowError, ValueError, KeyError) as e:
            failures.append(e)
            cancel_scope.cancel()
        finally:
            await client.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(min(HTTP_CONCURRENCY, len(jobs))):
            nursery.start_soon(lane, nursery.cancel_scope)
    if failures:
        e = failures[0]
        raise e if isinstance(e, SetupError) else SetupError(f"{type(e).__name__}: {e}") from e


def split(devices: list[DeviceSpec], procs: int) -> list[list[DeviceSpec]]:
    """Round-robin, so the two ends of a pair (and a group's members) land in different processes."""
    procs = max(1, min(procs, len(devices))) if devices else 1
    out: list[list[DeviceSpec]] = [[] for _ in range(procs)]
    for d in devices:
        out[d.index % procs].append(d)
    return out

