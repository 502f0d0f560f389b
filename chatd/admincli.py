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


def _ref(text) -> str:
    return urllib.parse.quote(str(text), safe="")


def command(group, name: str, method: str, path: str, *params, help: str,
            query=None, body=None) -> click.Command:
    """Declare one admin command on ``group`` (a ``click.Group``, or None for a top-level one):
    ``params`` are its click arguments and options (in the order they show), ``path`` the API path
    with ``{argument}`` fields (each URL-quoted), ``query``/``body`` functions of the arguments that
    give the query string and the JSON body. Every command takes the :func:`common` options and
    answers through :func:`call`."""
    def run(config_path, api, ca_file, as_json, **args):
        ctx = click.get_current_context()
        ctx.obj = {"config": config_path, "api": api, "ca_file": ca_file, "json": as_json}
        call(ctx, method, path.format(**{k: _ref(v) for k, v in args.items()}),
             body=body(args) if body else None, query=query(args) if query else None)
    for param in reversed(params):
        run = param(run)
    run = common(run)
    return (group.command if group else click.command)(name, help=help)(run)


LIMIT = click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
AFTER = click.option("--after", help="The 'next' of a previous page (--json shows it).")
USER, DEVICE, CHANNEL = click.argument("user"), click.argument("device"), click.argument("channel")


def _page(args: dict) -> dict:
    return {"limit": args["limit"], "after": args["after"]}


@click.group("users")
def users():
    """Users: list, search, show, disable/enable, reset-password, delete --erase."""


command(users, "list", "GET", "/v1/admin/users", LIMIT, AFTER, query=_page,
        help="List users, a page at a time. Example: chatd admin users list --limit 50")
command(users, "search", "GET", "/v1/admin/users", click.argument("text"),
        query=lambda a: {"q": a["text"], "limit": 1000},
        help="Users whose username or display name contains TEXT. Example: chatd admin users search alice")
command(users, "show", "GET", "/v1/admin/users/{user}", USER,
        help="One user (id or username), their devices and channels. Example: chatd admin users show alice")
command(users, "disable", "POST", "/v1/admin/users/{user}/disable", USER,
        help="Refuse the user's logins and close all their sessions. Example: chatd admin users disable mallory")
command(users, "enable", "POST", "/v1/admin/users/{user}/enable", USER,
        help="Let a disabled user log in again. Example: chatd admin users enable mallory")
command(users, "reset-password", "POST", "/v1/admin/users/{user}/password", USER,
        click.option("--password", default="", help="The new password [default: a random one, printed with --json]."),
        body=lambda a: {"password": a["password"]},
        help="Set a new password and log out every device. Example: chatd admin users reset-password bob --json")
command(users, "delete", "POST", "/v1/admin/users/{user}/erase", USER,
        click.option("--erase", is_flag=True, required=True,
                     help="Required: anonymise the account for good (GDPR erase)."),
        help="""Erase an account: anonymised (deleted-ID), disabled, tokens revoked, push tokens dropped,
    removed from its groups, and every message it sent redacted (a delete every device sees; a
    large account takes a while). Example: chatd admin users delete carol --erase""")


@click.group("devices")
def devices():
    """A user's devices: list, revoke."""


command(devices, "list", "GET", "/v1/admin/users/{user}/devices", USER,
        help="The user's logged-in devices. Example: chatd admin devices list bob")
command(devices, "revoke", "DELETE", "/v1/admin/users/{user}/devices/{device}", USER, DEVICE,
        help="Log one device out (its tokens revoked, its connections closed). "
             "Example: chatd admin devices revoke bob 3f9a0c1d")


@click.group("channels")
def channels():
    """Channels: list, show, add-member, remove-member, transfer, purge, delete-message."""


command(channels, "list", "GET", "/v1/admin/channels", LIMIT, AFTER, query=_page,
        help="List channels, a page at a time. Example: chatd admin channels list --json")
command(channels, "show", "GET", "/v1/admin/channels/{channel}", CHANNEL,
        help="A channel and its members. Example: chatd admin channels show g:4f0c2a9e1b7d3c55")
command(channels, "add-member", "POST", "/v1/admin/channels/{channel}/members", CHANNEL, USER,
        body=lambda a: {"user": a["user"]},
        help="Add a user to a group. Example: chatd admin channels add-member g:4f0c2a9e1b7d3c55 dave")
command(channels, "remove-member", "DELETE", "/v1/admin/channels/{channel}/members/{user}", CHANNEL, USER,
        help="Remove a user from a group (they get nothing more from it). "
             "Example: chatd admin channels remove-member g:4f0c2a9e1b7d3c55 dave")
command(channels, "transfer", "POST", "/v1/admin/channels/{channel}/owner", CHANNEL, USER,
        body=lambda a: {"user": a["user"]},
        help="Make a member the group's owner. Example: chatd admin channels transfer g:4f0c2a9e1b7d3c55 bob")
command(channels, "purge", "POST", "/v1/admin/channels/{channel}/purge", CHANNEL,
        click.option("--before", "before", required=True,
                     help="A date (YYYY-MM-DD, UTC midnight), a time (YYYY-MM-DDTHH:MM[:SS], UTC) or unix seconds."),
        body=lambda a: {"before": parse_when(a["before"])},
        help="""Delete the channel's messages written before a date (for every device, as retention does).
    Example: chatd admin channels purge g:4f0c2a9e1b7d3c55 --before 2026-01-01""")
command(channels, "delete-message", "DELETE", "/v1/admin/channels/{channel}/messages/{seq}", CHANNEL,
        click.argument("seq", type=click.IntRange(1)),
        help="""Moderation: delete message SEQ (its body, edits and reactions erased, its media released;
    every device sees the delete). Example: chatd admin channels delete-message g:4f0c2a9e1b7d3c55 42""")


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


stats = command(None, "stats", "GET", "/v1/admin/stats",
                click.option("--days", type=click.IntRange(1, 366), default=7, show_default=True,
                             help="Messages per day, this far back."),
                query=lambda a: {"days": a["days"]},
                help="Users, channels, messages (per day), storage size. Example: chatd admin stats --days 14")


def install(group: click.Group) -> None:
    for command in (users, devices, channels, stats):
        group.add_command(command)
    group.epilog = EPILOG
