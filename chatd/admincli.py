"""``chatd admin users|devices|channels|stats``: the operator's commands. Each asks a running API
server (``chatd run``, or any ``chatd api`` of a cluster) over HTTP with a fresh admin token
(:mod:`chatd.api.adminauth`, signed with the token secret of the config), so that its effects reach
every shard at once (see :mod:`chatd.api.routes.operator`).

Output: the one line the server answers in ``done`` (or the whole answer as JSON with ``--json``);
a failure is one line on stderr and exit status 1: the server's error code and message, or why the
server could not be reached.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

import click

from .config import Config, ConfigError

TIMEOUT_S = 120  # a search or stats of a large store scans it whole


def _config(path) -> Config:
    try:
        return Config.load(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def default_api_url(config: Config) -> str:
    host = config.server.api_host
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    scheme = "https" if config.server.tls_cert_file else "http"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{config.server.api_port}"


def call(ctx: click.Context, method: str, path: str, body: dict | None = None, query: dict | None = None) -> None:
    """Ask the API server, print the answer (``done`` or JSON), exit 1 on an error answer."""
    from .api.adminauth import issue_admin_token
    from .datadir import load_secret
    opts = ctx.obj
    config = _config(opts["config"])
    if not config.auth.secret and not (config.data_path / "secret.key").exists():
        raise click.ClickException("no token secret: set auth.secret (cluster), or run this with the config of "
                                   f"the `chatd run` whose data directory holds it ({config.data_path / 'secret.key'})")
    token = issue_admin_token(load_secret(config.auth.secret, config.data_path))
    base = opts["api"] or default_api_url(config)
    url = base.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {token}"})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    context = ssl.create_default_context(cafile=opts["ca_file"]) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S, context=context) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read())["error"]
            text = f"{err['code']}: {err['message']}"
        except (ValueError, KeyError, TypeError):
            text = f"HTTP {e.code}"
        raise click.ClickException(text) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise click.ClickException(f"no chatd API server answered at {base} ({reason}): is chatd running? "
                                   "pass --api URL") from None
    click.echo(json.dumps(answer, indent=2, sort_keys=True) if opts["json"] else answer.get("done", ""))


EPILOG = """\b
Commands, with an example each:
  chatd admin users list                 chatd admin users list --limit 50
  chatd admin users search TEXT          chatd admin users search alice
  chatd admin users show USER            chatd admin users show alice   (USER: id or username)
  chatd admin users disable USER         chatd admin users disable mallory
  chatd admin users enable USER          chatd admin users enable mallory
  chatd admin users reset-password USER  chatd admin users reset-password bob --password 'n3w-secret'
  chatd admin users delete USER --erase  chatd admin users delete carol --erase
  chatd admin devices list USER          chatd admin devices list bob
  chatd admin devices revoke USER DEVICE chatd admin devices revoke bob 3f9a0c1d2e4b5a69
  chatd admin channels list              chatd admin channels list --json
  chatd admin channels show CHANNEL      chatd admin channels show g:4f0c2a9e1b7d3c55
  chatd admin channels add-member CHANNEL USER     chatd admin channels add-member g:4f0c2a9e1b7d3c55 dave
  chatd admin channels remove-member CHANNEL USER  chatd admin channels remove-member g:4f0c2a9e1b7d3c55 dave
  chatd admin channels transfer CHANNEL USER       chatd admin channels transfer g:4f0c2a9e1b7d3c55 bob
  chatd admin channels purge CHANNEL --before DATE chatd admin channels purge g:4f0c2a9e1b7d3c55 --before 2026-01-01
  chatd admin channels delete-message CHANNEL SEQ  chatd admin channels delete-message g:4f0c2a9e1b7d3c55 42
  chatd admin invite                     chatd admin invite --uses 5 --ttl-s 86400
  chatd admin stats                      chatd admin stats --days 14
Every command but invite asks a running API server (--api, default: the config's
server.api_host:api_port) and prints one line (--json: the whole answer)."""


def common(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print the whole answer as JSON.")(f)
    f = click.option("--api", help="The API server to ask. [default: server.api_host:api_port of the config]")(f)
    f = click.option("--ca-file", type=click.Path(dir_okay=False, exists=True),
                     help="CA certificate(s) to check an https API server with.")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")(f)
    return f


def _ctx(config_path, api, ca_file, as_json) -> click.Context:
    ctx = click.get_current_context()
    ctx.obj = {"config": config_path, "api": api, "ca_file": ca_file, "json": as_json}
    return ctx


def _ref(text: str) -> str:
    return urllib.parse.quote(text, safe="")


@click.group("users")
def users():
    """Users: list, search, show, disable/enable, reset-password, delete --erase."""


@users.command("list")
@common
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--after", help="The 'next' of a previous page (--json shows it).")
def users_list(config_path, api, ca_file, as_json, limit, after):
    """List users, a page at a time. Example: chatd admin users list --limit 50"""
    call(_ctx(config_path, api, ca_file, as_json), "GET", "/v1/admin/users", query={"limit": limit, "after": after})


@users.command("search")
@common
@click.argument("text")
def users_search(config_path, api, ca_file, as_json, text):
    """Users whose username or display name contains TEXT. Example: chatd admin users search alice"""
    call(_ctx(config_path, api, ca_file, as_json), "GET", "/v1/admin/users", query={"q": text, "limit": 1000})


@users.command("show")
@common
@click.argument("user")
def users_show(config_path, api, ca_file, as_json, user):
    """One user (id or username), their devices and channels. Example: chatd admin users show alice"""
    call(_ctx(config_path, api, ca_file, as_json), "GET", f"/v1/admin/users/{_ref(user)}")


@users.command("disable")
@common
@click.argument("user")
def users_disable(config_path, api, ca_file, as_json, user):
    """Refuse the user's logins and close all their sessions. Example: chatd admin users disable mallory"""
    call(_ctx(config_path, api, ca_file, as_json), "POST", f"/v1/admin/users/{_ref(user)}/disable")


@users.command("enable")
@common
@click.argument("user")
def users_enable(config_path, api, ca_file, as_json, user):
    """Let a disabled user log in again. Example: chatd admin users enable mallory"""
    call(_ctx(config_path, api, ca_file, as_json), "POST", f"/v1/admin/users/{_ref(user)}/enable")


@users.command("reset-password")
@common
@click.argument("user")
@click.option("--password", default="", help="The new password [default: a random one, printed with --json].")
def users_reset_password(config_path, api, ca_file, as_json, user, password):
    """Set a new password and log out every device. Example: chatd admin users reset-password bob --json"""
    call(_ctx(config_path, api, ca_file, as_json), "POST", f"/v1/admin/users/{_ref(user)}/password",
         body={"password": password})


@users.command("delete")
@common
@click.argument("user")
@click.option("--erase", is_flag=True, required=True, help="Required: anonymise the account for good (GDPR erase).")
def users_delete(config_path, api, ca_file, as_json, user, erase):
    """Erase an account: anonymised (deleted-ID), disabled, tokens revoked, push tokens dropped,
    removed from its groups, and every message it sent redacted (a delete every device sees; a
    large account takes a while). Example: chatd admin users delete carol --erase"""
    call(_ctx(config_path, api, ca_file, as_json), "POST", f"/v1/admin/users/{_ref(user)}/erase")


@click.group("devices")
def devices():
    """A user's devices: list, revoke."""


@devices.command("list")
@common
@click.argument("user")
def devices_list(config_path, api, ca_file, as_json, user):
    """The user's logged-in devices. Example: chatd admin devices list bob"""
    call(_ctx(config_path, api, ca_file, as_json), "GET", f"/v1/admin/users/{_ref(user)}/devices")


@devices.command("revoke")
@common
@click.argument("user")
@click.argument("device")
def devices_revoke(config_path, api, ca_file, as_json, user, device):
    """Log one device out (its tokens revoked, its connections closed). Example: chatd admin devices revoke bob 3f9a0c1d"""
    call(_ctx(config_path, api, ca_file, as_json), "DELETE", f"/v1/admin/users/{_ref(user)}/devices/{_ref(device)}")


@click.group("channels")
def channels():
    """Channels: list, show, add-member, remove-member, transfer, purge, delete-message."""


@channels.command("list")
@common
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--after", help="The 'next' of a previous page (--json shows it).")
def channels_list(config_path, api, ca_file, as_json, limit, after):
    """List channels, a page at a time. Example: chatd admin channels list --json"""
    call(_ctx(config_path, api, ca_file, as_json), "GET", "/v1/admin/channels", query={"limit": limit, "after": after})


@channels.command("show")
@common
@click.argument("channel")
def channels_show(config_path, api, ca_file, as_json, channel):
    """A channel and its members. Example: chatd admin channels show g:4f0c2a9e1b7d3c55"""
    call(_ctx(config_path, api, ca_file, as_json), "GET", f"/v1/admin/channels/{_ref(channel)}")


@channels.command("add-member")
@common
@click.argument("channel")
@click.argument("user")
def channels_add(config_path, api, ca_file, as_json, channel, user):
    """Add a user to a group. Example: chatd admin channels add-member g:4f0c2a9e1b7d3c55 dave"""
    call(_ctx(config_path, api, ca_file, as_json), "POST", f"/v1/admin/channels/{_ref(channel)}/members",
         body={"user": user})


@channels.command("remove-member")
@common
@click.argument("channel")
@click.argument("user")
def channels_remove(config_path, api, ca_file, as_json, channel, user):
    """Remove a user from a group (they get nothing more from it). Example: chatd admin channels remove-member g:4f0c2a9e1b7d3c55 dave"""
    call(_ctx(config_path, api, ca_file, as_json), "DELETE", f"/v1/admin/channels/{_ref(channel)}/members/{_ref(user)}")


@channels.command("transfer")
@common
@click.argument("channel")
@click.argument("user")
def channels_transfer(config_path, api, ca_file, as_json, channel, user):
    """Make a member the group's owner. Example: chatd admin channels transfer g:4f0c2a9e1b7d3c55 bob"""
    call(_ctx(config_path, api, ca_file, as_json), "POST", f"/v1/admin/channels/{_ref(channel)}/owner",
         body={"user": user})


@channels.command("purge")
@common
@click.argument("channel")
@click.option("--before", "before", required=True,
              help="A date (YYYY-MM-DD, UTC midnight), a time (YYYY-MM-DDTHH:MM[:SS], UTC) or unix seconds.")
def channels_purge(config_path, api, ca_file, as_json, channel, before):
    """Delete the channel's messages written before a date (for every device, as retention does).
    Example: chatd admin channels purge g:4f0c2a9e1b7d3c55 --before 2026-01-01"""
    call(_ctx(config_path, api, ca_file, as_json), "POST", f"/v1/admin/channels/{_ref(channel)}/purge",
         body={"before": parse_when(before)})


@channels.command("delete-message")
@common
@click.argument("channel")
@click.argument("seq", type=click.IntRange(1))
def channels_delete_message(config_path, api, ca_file, as_json, channel, seq):
    """Moderation: delete message SEQ (its body, edits and reactions erased, its media released;
    every device sees the delete). Example: chatd admin channels delete-message g:4f0c2a9e1b7d3c55 42"""
    call(_ctx(config_path, api, ca_file, as_json), "DELETE", f"/v1/admin/channels/{_ref(channel)}/messages/{seq}")


def parse_when(text: str) -> float:
    import calendar
    import time as _time
    try:
        return float(text)
    except ValueError:
        pass
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return float(calendar.timegm(_time.strptime(text, fmt)))
        except ValueError:
            continue
    raise click.BadParameter(f"{text!r} is not YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS] (UTC) or unix seconds",
                             param_hint="--before")


@click.command("stats")
@common
@click.option("--days", type=click.IntRange(1, 366), default=7, show_default=True, help="Messages per day, this far back.")
def stats(config_path, api, ca_file, as_json, days):
    """Users, channels, messages (per day), storage size. Example: chatd admin stats --days 14"""
    call(_ctx(config_path, api, ca_file, as_json), "GET", "/v1/admin/stats", query={"days": days})


def install(group: click.Group) -> None:
    for command in (users, devices, channels, stats):
        group.add_command(command)
    group.epilog = EPILOG
