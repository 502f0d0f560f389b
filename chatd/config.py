"""One typed configuration for every role.

Sources, later wins: defaults < TOML file (``--config``) < environment (``CHATD_<SECTION>__<KEY>``,
e.g. ``CHATD_SERVER__API_PORT=9000``) < explicit overrides passed by the CLI or tests.

Policy: an unknown section or key, in the file or in the environment, is an error
(:class:`ConfigError`) naming it; a value of the wrong type is an error too. Units are in names
(``_s`` seconds, ``_bytes``, ``_chars``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    pass


STORE_BACKENDS = ("sqlite", "cassandra")
REGISTRATION = ("open", "invite", "closed")


@dataclass
class ServerConfig:
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    ws_host: str = "127.0.0.1"
    ws_port: int = 8081
    # What clients are told to connect to; default derives from ws_host/ws_port.
    public_ws_url: str = ""
    shard_id: str = "shard-1"
    shutdown_grace_s: float = 5.0
    # Reverse proxies (addresses or CIDRs) whose X-Forwarded-For / Forwarded headers name the
    # client; the client is the right-most hop not listed. Empty: the TCP peer is the client.
    trusted_proxies: list[str] = field(default_factory=list)
    # The header those proxies set: "x-forwarded-for" or "forwarded" (RFC 7239); the other is ignored.
    proxy_header: str = "x-forwarded-for"
    # An HTTP request body not received within this long is answered 408 and its connection closed.
    http_body_timeout_s: float = 30.0
    # TLS on the API port, the WebSocket port and a shard's admin port: a PEM certificate chain
    # and its unencrypted PEM key (both or neither; relative paths: to the working directory).
    # SIGHUP reloads both files for new connections. Empty: plain HTTP and ws://.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # /metrics on a listener of its own (metrics_host:metrics_port; port 0: any free one), and
    # then not on api_port; plain HTTP (bind a private address). Empty: /metrics on api_port.
    metrics_host: str = ""
    metrics_port: int = 9100


@dataclass
class StoreConfig:
    backend: str = "sqlite"
    # SQLite: the database file; relative paths are relative to data_dir.
    sqlite_path: str = "chatd.db"
    # "full" fsyncs each group commit (durable across power loss); "normal" only across crashes.
    sqlite_synchronous: str = "full"
    commit_batch_max: int = 512
    # SQLite: a commit waits up to this long after its oldest write was queued for more writes to
    # share its fsync (only while such waits gather some; see docs/operations.md). 0: never waits.
    commit_delay_s: float = 0.002
    read_connections: int = 4


PRESENCE_VISIBILITY = ("contacts", "everyone")


@dataclass
class PresenceConfig:
    # Offline once no device has heartbeated for this long (clients heartbeat every
    # limits.heartbeat_interval_s); reconnecting within it changes nothing for anybody.
    grace_s: float = 30.0
    # At most one published change per user per this many seconds (flapping is absorbed).
    coalesce_s: float = 1.0
    # Presence is pushed to members of groups up to this size; bigger groups fetch it on demand.
    group_push_max: int = 20
    max_subscriptions: int = 1000  # explicit subscribe_presence targets per connection
    server_id: str = "p1"  # chatd presence: this server's id (unique among presence servers)
    max_query: int = 500  # users per presence query
    # Who sees a user's presence: "contacts" (who shares a group or a 1:1 channel with a message with
    # them; the others see "offline", never seen) or "everyone" (every account). chatd/presence/visibility.py
    visibility: str = "contacts"


@dataclass
class ClusterConfig:
    """Cluster mode (``chatd shard`` / ``chatd api``); ``chatd run`` ignores it."""
    zk_hosts: str = "127.0.0.1:2181"
    zk_root: str = "/chatd"
    # A killed shard's channels move to the survivors after this long (its znode expires). 4 s is
    # the least a stock ZooKeeper grants (2 x its tickTime of 2 s); see docs/operations.md.
    zk_session_timeout_s: float = 4.0
    # Shared secret authenticating inter-shard links (HMAC); required in cluster mode.
    secret: str = ""
    link_host: str = "127.0.0.1"
    link_port: int = 8091
    # host:port other shards dial; default link_host:<bound port>.
    link_public_addr: str = ""
    link_max_frame_bytes: int = 4 * 1024 * 1024
    link_queue_frames: int = 10_000
    # A ping after this long without traffic; a link silent for 3 heartbeats is dead (< 1 s).
    link_heartbeat_s: float = 0.3
    load_refresh_s: float = 2.0
    # Logins go to the least-loaded shard when the user's home has more connections than this (0 = never).
    overload_connections: int = 0
    # "user:password": chatd authenticates to ZooKeeper with this digest and creates its znodes
    # readable and writable by that identity only. Empty: no authentication, open ACLs.
    zk_auth: str = ""


@dataclass
class CassandraConfig:
    """Used when ``store.backend = "cassandra"`` (see docs/operations.md)."""
    contact_points: str = "127.0.0.1"  # comma-separated host[:port] list
    port: int = 9042
    keyspace: str = "chatd"
    local_dc: str = ""  # required for DC-aware load balancing on multi-DC clusters
    # Used only by `chatd store migrate` when it creates the keyspace.
    replication: str = "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}"
    read_consistency: str = "LOCAL_QUORUM"
    write_consistency: str = "LOCAL_QUORUM"
    serial_consistency: str = "LOCAL_SERIAL"
    username: str = ""
    password: str = ""
    request_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    # TLS to Cassandra (client_encryption_options): on when tls_ca_file (PEM CA bundle the nodes'
    # certificates are checked against) is set; tls_cert_file/tls_key_file: a client certificate
    # (both or neither) for nodes that require one; tls_check_hostname: each node's certificate
    # must name the address it is reached at.
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_check_hostname: bool = True


@dataclass
class AuthConfig:
    # HMAC secret for tokens; empty = generated once and kept in data_dir/secret.key.
    secret: str = ""
    token_ttl_s: float = 7 * 24 * 3600
    # scrypt cost (N, with r=8, p=1): OWASP's 2**17 (128 MiB, ~0.3 s on one core). Must be a
    # power of two. A login re-hashes a password hashed with a smaller N.
    scrypt_n: int = 2**17
    # Password hashing runs in worker threads: this many for logins, this many more for sign-ups
    # (sign-ups never take a login's thread); a request finding more than hashing_queue_max
    # others waiting for its threads is answered 503 unavailable with Retry-After.
    login_hashing_threads: int = 2
    signup_hashing_threads: int = 1
    hashing_queue_max: int = 16
    # Who may sign up: "open" (anyone), "invite" (with a token from `chatd admin invite`), "closed".
    registration: str = "open"
    # Sign-ups per client address (a token bucket; every attempt counts): 429 with Retry-After.
    signups_per_ip_burst: int = 5
    signups_per_ip_per_hour: float = 20.0
    # Addresses (or CIDRs) whose sign-ups are not throttled (e.g. a load tester's); none by default: behind a
    # proxy on this host every client would otherwise be 127.0.0.1 (list the proxy in
    # server.trusted_proxies instead).
    signups_unthrottled: list[str] = field(default_factory=list)
    # Failed-login throttling (only failures count): per username and per client address.
    # Over the limit: 429 rate_limited with Retry-After, before any password check.
    login_failures_per_user_burst: int = 10
    login_failures_per_user_per_min: float = 2.0
    login_failures_per_ip_burst: int = 50
    login_failures_per_ip_per_min: float = 30.0


@dataclass
class LimitsConfig:
    max_frame_bytes: int = 512 * 1024
    max_body_chars: int = 100_000
    max_group_members: int = 1000  # the owner included (docs/operations.md: group size and cost)
    # Per-connection token bucket over all incoming frames.
    rate_frames_per_s: float = 100.0
    rate_burst: int = 200
    # Consecutive rate-limited frames after which the connection is closed (flood).
    flood_close_after: int = 500
    # Outgoing frames queued per connection before it is cut off as a slow consumer.
    send_queue_frames: int = 1024
    max_inflight_sends: int = 64
    auth_timeout_s: float = 10.0
    # Every send is answered (ack or error) within this many seconds, whatever fails behind it.
    send_answer_s: float = 2.0
    # What the auth reply tells clients: heartbeat this often (presence: a device is offline
    # presence.grace_s after its last heartbeat, so this stays below the grace). 20 s, not 5: at
    # 5 s, heartbeats were the idle shard's CPU (1,000 a second per 5,000 connections; issue 24).
    heartbeat_interval_s: float = 20.0
    history_page_max: int = 500
    sync_page: int = 500
    # Bytes queued for one connection (framed replies, events, messages, the write in progress):
    # over it the connection's frames are not read; over it for slow_consumer_s: close 1013.
    send_queue_bytes: int = 1024 * 1024
    slow_consumer_s: float = 10.0
    # Requests served in tasks (history, presence, typing, read, logout...) at once per connection;
    # at the cap the connection's next frame waits for a slot.
    max_inflight_requests: int = 4
    # WebSocket connections per user (on one shard) and per client address (0: no cap); over the
    # cap: error too_many_connections, close 4029.
    max_connections_per_user: int = 32
    max_connections_per_address: int = 256
    # The message lifecycle (chatd/lifecycle.py): an author edits a message for this long after
    # sending it (0: for ever); distinct emoji one message may carry.
    edit_window_s: float = 86_400.0
    max_reaction_kinds: int = 20
    # Receipt events (received / read positions) are coalesced: one per channel per this interval.
    receipt_interval_s: float = 1.0
    # A server ping after ping_interval_s without anything received; nothing received for
    # idle_timeout_s (no frame, no pong): close 4000.
    ping_interval_s: float = 25.0
    idle_timeout_s: float = 75.0
    # Channels one sync may name (more: bad_field); after sync_max_errors channel errors in one
    # sync the rest are answered 'skipped' without reading the store.
    sync_max_channels: int = 2000
    sync_max_errors: int = 100
    # Groups one user may create per rolling hour (counted in the store: every API server sees the
    # same count); over it: 429 too_many_groups with Retry-After. 0: no cap.
    groups_created_per_hour: int = 20
    # The HTTP transports (SSE, long polling, POST /v1/frames; docs/protocol.md "Transports"):
    # a poll with nothing to answer waits this long (then answers empty); an SSE stream with
    # nothing to send writes a keep-alive comment after sse_keepalive_s (below proxies' idle
    # timeouts, often 30-60 s); one SSE write or poll answer carries at most http_flush_bytes
    # of events (plus one); a poll or frames session nobody used for http_session_idle_s ends;
    # a POST carries at most http_frames_per_post requests.
    poll_wait_s: float = 25.0
    sse_keepalive_s: float = 15.0
    http_flush_bytes: int = 64 * 1024
    http_session_idle_s: float = 30.0
    http_frames_per_post: int = 64


PUSH_PROVIDERS = ("none", "webhook", "matrix")


@dataclass
class PushConfig:
    """Push notifications for members with no connected device (docs/push.md)."""
    provider: str = "none"  # "none" | "webhook" | "matrix"
    # webhook: POST JSON here, body signed with HMAC-SHA256(webhook_secret) in X-Chatd-Signature
    webhook_url: str = ""
    webhook_secret: str = ""
    # matrix: a Matrix Push Gateway (e.g. Sygnal); /_matrix/push/v1/notify is appended to a base URL
    matrix_gateway_url: str = ""
    matrix_app_id: str = ""  # app_id for tokens registered without one
    request_timeout_s: float = 10.0
    retry_base_s: float = 2.0  # backoff after the first failure; doubles per attempt
    retry_cap_s: float = 300.0
    max_attempts: int = 8  # then the push is dropped (logged, counted)
    coalesce_window_s: float = 3.0  # messages of one channel within this window: one notification
    include_body: bool = False  # privacy: by default sender, channel, count and seqs only
    body_max_chars: int = 120
    queue_max: int = 10_000  # delivery hook -> outbox writer; full = pushes dropped (counted)
    lease_s: float = 30.0  # outbox slot leases (cluster: which shard sends which slots)
    poll_interval_s: float = 2.0  # how often the sender looks for rows written by other processes
    max_inflight: int = 32  # concurrent gateway requests


MEDIA_BACKENDS = ("fs", "s3")


@dataclass
class MediaConfig:
    """Uploads: photos, voice, video, files (docs/media.md)."""
    backend: str = "fs"  # "fs": files under <data_dir>/media; "s3": an S3-compatible object store
    max_bytes: int = 25 * 1024 * 1024  # one upload; above: 413, the upload discarded
    # the hourly quota per user (uploads in the last hour): above either, 429 + Retry-After
    uploads_per_hour: int = 200
    bytes_per_hour: int = 1024 * 1024 * 1024
    # an upload no message referenced within this long is deleted
    orphan_ttl_s: float = 24 * 3600.0
    gc_interval_s: float = 300.0
    # processing (chatd/media/worker.py): concurrent worker processes, each one file, with limits
    workers: int = 2
    worker_timeout_s: float = 30.0
    worker_memory_bytes: int = 1024 * 1024 * 1024
    max_pixels: int = 50_000_000  # an image above is stored as a plain file (decompression bombs)
    # s3
    s3_endpoint: str = ""  # e.g. "https://s3.eu-west-1.amazonaws.com" or "http://127.0.0.1:8333"
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_path_style: bool = True
    s3_access_key: str = ""  # empty: AWS_ACCESS_KEY_ID
    s3_secret_key: str = ""  # empty: AWS_SECRET_ACCESS_KEY
    s3_part_bytes: int = 8 * 1024 * 1024  # multipart upload above this size, in parts of it
    # > 0: an authorized download is a 302 to a presigned bucket URL valid this long (the bucket
    # needs CORS for the web client, docs/media.md); 0: chatd streams the bytes itself
    s3_presign_s: int = 0


@dataclass
class RetentionConfig:
    """How long messages are kept (docs/operations.md, retention). Days may be fractional."""
    messages_days: float = 0.0  # 0: forever
    dm_messages_days: float = -1.0  # 1:1 channels; negative: as messages_days
    group_messages_days: float = -1.0  # groups; negative: as messages_days
    sweep_interval_s: float = 3600.0  # how often each shard expires the channels it owns

    def days_for(self, kind: str) -> float:
        """Days a message of a channel of ``kind`` ("dm" | "group") is kept; 0: forever."""
        own = self.dm_messages_days if kind == "dm" else self.group_messages_days
        return self.messages_days if own < 0 else own


@dataclass
class Config:
    data_dir: str = "./data"
    log_level: str = "info"
    log_format: str = "text"  # "text" | "json": one JSON object per line (chatd/logsetup.py)
    # levels per logger, "logger=level": e.g. ["chatd.shard=debug", "cassandra=warning"]
    log_levels: list[str] = field(default_factory=list)
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cassandra: CassandraConfig = field(default_factory=CassandraConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    push: PushConfig = field(default_factory=PushConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    media: MediaConfig = field(default_factory=MediaConfig)

    # ---- loaders ---------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: dict) -> "Config":
        cfg = cls()
        cfg.update(data, source="mapping")
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: dict | None = None,
             overrides: dict | None = None) -> "Config":
        cfg = cls()
        if path is not None:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except FileNotFoundError:
                raise ConfigError(f"config file not found: {path}") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: invalid TOML: {e}") from None
            cfg.update(data, source=str(path))
        cfg.update(env_overrides(os.environ if env is None else env), source="environment")
        if overrides:
            cfg.update(overrides, source="overrides")
        cfg.validate()
        return cfg

    def update(self, data: dict, source: str) -> None:
        for key, value in data.items():
            _set(self, key, value, source, prefix="")

    def validate(self) -> None:
        if self.store.backend not in STORE_BACKENDS:
            raise ConfigError(f"store.backend: unknown backend {self.store.backend!r} "
                              f"(known: {', '.join(STORE_BACKENDS)})")
        if self.store.sqlite_synchronous not in ("full", "normal"):
            raise ConfigError("store.sqlite_synchronous must be 'full' or 'normal'")
        if not 0 <= self.store.commit_delay_s <= 0.1:
            raise ConfigError("store.commit_delay_s must be between 0 and 0.1")
        n = self.auth.scrypt_n
        if n < 2 or n & (n - 1):
            raise ConfigError("auth.scrypt_n must be a power of two >= 2")
        for name in ("login_failures_per_user_burst", "login_failures_per_user_per_min",
                     "login_failures_per_ip_burst", "login_failures_per_ip_per_min",
                     "login_hashing_threads", "signup_hashing_threads", "hashing_queue_max",
                     "signups_per_ip_burst", "signups_per_ip_per_hour"):
            if getattr(self.auth, name) <= 0:
                raise ConfigError(f"auth.{name} must be > 0")
        if self.auth.registration not in REGISTRATION:
            raise ConfigError(f"auth.registration must be one of {', '.join(REGISTRATION)}")
        if self.log_format not in ("text", "json"):
            raise ConfigError("log_format must be 'text' or 'json'")
        from .logsetup import parse_levels
        try:
            parse_levels(self.log_levels)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        r = self.retention
        if r.messages_days < 0 or r.sweep_interval_s <= 0:
            raise ConfigError("retention.messages_days must be >= 0 (0: forever) and retention.sweep_interval_s > 0")
        self._validate_trusted_proxies()
        self._validate_tls()
        self._validate_media()
        for name in ("max_frame_bytes", "max_body_chars", "max_group_members", "rate_burst",
                     "send_queue_frames", "max_inflight_sends", "history_page_max", "sync_page",
                     "max_reaction_kinds"):
            if getattr(self.limits, name) < 1:
                raise ConfigError(f"limits.{name} must be >= 1")
        if self.limits.send_answer_s <= 0:
            raise ConfigError("limits.send_answer_s must be > 0")
        if self.limits.edit_window_s < 0:
            raise ConfigError("limits.edit_window_s must be >= 0 (0: no limit)")
        if self.presence.visibility not in PRESENCE_VISIBILITY:
            raise ConfigError(f"presence.visibility must be one of {', '.join(PRESENCE_VISIBILITY)}")
        self._validate_connection_limits()
        if self.cluster.link_heartbeat_s <= 0:
            raise ConfigError("cluster.link_heartbeat_s must be > 0")
        if self.auth.secret:  # (empty: chatd run generates one into data_dir/secret.key)
            check_secret("auth.secret", self.auth.secret)
        self._validate_push()

    def _validate_connection_limits(self) -> None:
        lim = self.limits
        for name in ("send_queue_bytes", "max_inflight_requests", "max_connections_per_user",
                     "sync_max_channels", "sync_max_errors"):
            if getattr(lim, name) < 1:
                raise ConfigError(f"limits.{name} must be >= 1")
        if lim.groups_created_per_hour < 0:
            raise ConfigError("limits.groups_created_per_hour must be >= 0 (0: no cap)")
        if not 0 <= self.server.metrics_port <= 65535:
            raise ConfigError("server.metrics_port must be a port number (0: any free port)")
        if lim.max_connections_per_address < 0:
            raise ConfigError("limits.max_connections_per_address must be >= 0 (0: no cap)")
        for name in ("http_flush_bytes", "http_frames_per_post"):
            if getattr(lim, name) < 1:
                raise ConfigError(f"limits.{name} must be >= 1")
        for name in ("slow_consumer_s", "ping_interval_s", "idle_timeout_s", "poll_wait_s", "sse_keepalive_s",
                     "http_session_idle_s", "heartbeat_interval_s"):
            if getattr(lim, name) <= 0:
                raise ConfigError(f"limits.{name} must be > 0")
        if lim.idle_timeout_s < lim.ping_interval_s:
            raise ConfigError("limits.idle_timeout_s must be >= limits.ping_interval_s")

    def _validate_trusted_proxies(self) -> None:
        if self.server.http_body_timeout_s <= 0:
            raise ConfigError("server.http_body_timeout_s must be > 0")
        if self.server.proxy_header not in ("x-forwarded-for", "forwarded"):
            raise ConfigError("server.proxy_header must be 'x-forwarded-for' or 'forwarded'")
        for where, entries in (("server.trusted_proxies", self.server.trusted_proxies),
                               ("auth.signups_unthrottled", self.auth.signups_unthrottled)):
            for entry in entries:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ConfigError(f"{where}: {entry!r} is not an address or CIDR") from None

    def _validate_tls(self) -> None:
        s, c = self.server, self.cassandra
        if bool(s.tls_cert_file) != bool(s.tls_key_file):
            raise ConfigError("server.tls_cert_file and server.tls_key_file go together: set both or neither")
        if bool(c.tls_cert_file) != bool(c.tls_key_file):
            raise ConfigError("cassandra.tls_cert_file and cassandra.tls_key_file go together: set both or neither")
        if c.tls_cert_file and not c.tls_ca_file:
            raise ConfigError("cassandra.tls_cert_file needs cassandra.tls_ca_file (TLS to Cassandra is on "
                              "only with a CA to check the nodes against)")
        if self.cluster.zk_auth:
            user, sep, password = self.cluster.zk_auth.partition(":")
            if not (sep and user and password):
                raise ConfigError("cluster.zk_auth must be \"user:password\" (both non-empty)")

    def _validate_media(self) -> None:
        m = self.media
        if m.backend not in MEDIA_BACKENDS:
            raise ConfigError(f"media.backend: unknown backend {m.backend!r} (known: {', '.join(MEDIA_BACKENDS)})")
        if m.backend == "s3" and not (m.s3_endpoint and m.s3_bucket):
            raise ConfigError("media.backend = 's3' needs media.s3_endpoint and media.s3_bucket")
        for name in ("max_bytes", "uploads_per_hour", "bytes_per_hour", "orphan_ttl_s", "gc_interval_s", "workers",
                     "worker_timeout_s", "worker_memory_bytes", "max_pixels"):
            if getattr(m, name) <= 0:
                raise ConfigError(f"media.{name} must be > 0")
        if not 0 <= m.s3_presign_s <= 7 * 24 * 3600:
            raise ConfigError("media.s3_presign_s must be between 0 and 604800 (S3's longest presigned URL)")
        if m.s3_part_bytes < 5 * 1024 * 1024:
            raise ConfigError("media.s3_part_bytes must be at least 5 MiB (S3's smallest part)")

    def _validate_push(self) -> None:
        p = self.push
        if p.provider not in PUSH_PROVIDERS:
            raise ConfigError(f"push.provider: unknown provider {p.provider!r} (known: {', '.join(PUSH_PROVIDERS)})")
        if p.provider == "webhook" and not (p.webhook_url and p.webhook_secret):
            raise ConfigError("push.provider = 'webhook' needs push.webhook_url and push.webhook_secret")
        if p.provider == "webhook":
            check_secret("push.webhook_secret", p.webhook_secret)
        if p.provider == "matrix" and not p.matrix_gateway_url:
            raise ConfigError("push.provider = 'matrix' needs push.matrix_gateway_url")
        for name in ("request_timeout_s", "retry_base_s", "retry_cap_s", "lease_s", "poll_interval_s"):
            if getattr(p, name) <= 0:
                raise ConfigError(f"push.{name} must be > 0")
        if p.coalesce_window_s < 0:
            raise ConfigError("push.coalesce_window_s must be >= 0")
        for name in ("max_attempts", "body_max_chars", "queue_max", "max_inflight"):
            if getattr(p, name) < 1:
                raise ConfigError(f"push.{name} must be >= 1")
        if p.lease_s <= 2 * p.request_timeout_s:
            raise ConfigError("push.lease_s must be more than twice push.request_timeout_s")

    def validate_cluster(self, role: str) -> None:
        """Extra checks for the cluster roles: shared secrets must be set explicitly."""
        if not self.cluster.secret:
            raise ConfigError(f"chatd {role}: cluster.secret must be set (the same on every shard and API server; "
                              f"make one with `chatd secret`)")
        if not self.auth.secret:
            raise ConfigError(f"chatd {role}: auth.secret must be set (the same on every shard and API server; "
                              f"make one with `chatd secret`)")
        check_secret("cluster.secret", self.cluster.secret)

    # ---- derived ---------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def resolve(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.data_path / path


# Secrets: HMAC keys (tokens, links, push webhooks). A key anyone can read (the examples' old
# placeholders) or guess (a short word) lets anyone sign tokens: refused at start-up.
MIN_SECRET_BYTES = 32
KNOWN_PLACEHOLDERS = frozenset({"change-me-token-secret", "change-me-link-secret", "change-me", "changeme",
                                "secret", "password"})


def check_secret(name: str, value: str) -> None:
    """Refuse (``ConfigError``) a known placeholder or a secret shorter than ``MIN_SECRET_BYTES``."""
    if value.strip().lower() in KNOWN_PLACEHOLDERS or "change-me" in value.lower():
        raise ConfigError(f"{name} is a published placeholder: anyone could sign with it; "
                          f"set a fresh one (`chatd secret` prints one)")
    if len(value.encode("utf-8", "surrogatepass")) < MIN_SECRET_BYTES:
        raise ConfigError(f"{name} is shorter than {MIN_SECRET_BYTES} bytes; "
                          f"set a fresh one (`chatd secret` prints one)")


def env_overrides(env) -> dict:
    """``CHATD_SECTION__KEY=value`` (or ``CHATD__KEY`` for top-level keys) -> nested dict of strings."""
    out: dict = {}
    for name, value in env.items():
        if not name.startswith("CHATD_") or "__" not in name:
            continue
        rest = name[len("CHATD_"):].lower()
        path = [rest[1:]] if rest.startswith("_") else rest.split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _set(obj, key, value, source, prefix):
    fields = {f.name: f for f in dataclasses.fields(obj)}
    where = f"{prefix}{key}"
    if key not in fields:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown config key {where!r} (known here: {known})")
    hint = typing.get_type_hints(type(obj))[key]
    current = getattr(obj, key)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where!r} must be a table")
        for k, v in value.items():
            _set(current, k, v, source, prefix=f"{where}.")
        return
    setattr(obj, key, _coerce(value, hint, where, source))


def _coerce(value, hint, where, source):
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                return int(value, 0)
            raise ValueError
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value)
            raise ValueError
        if hint is str:
            if isinstance(value, str):
                return value
            raise ValueError
        if hint == list[str]:  # a TOML array of strings, or a comma-separated string (environment)
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError
    except ValueError:
        pass
    raise ConfigError(f"{source}: {where!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")
