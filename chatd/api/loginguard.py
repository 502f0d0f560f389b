"""Failed-login throttling, pure (the caller passes the clock reading).

Password guessing is slowed twice: per username (an attacker spreading guesses over many
addresses still meets the account's bucket) and per client address (one address trying many
usernames meets its own). Only *failed* logins take tokens, so a crowd of real users behind one
address (or a load tester on loopback) logging in correctly is never throttled. A throttled
login is refused before the password is checked: no scrypt work is spent on it.

Resources: two dicts of token buckets, each capped at ``max_entries``; when a dict is full,
buckets that have refilled completely (they carry no information) are dropped, and if none
has, the oldest entries go. Behind a reverse proxy the client address is the proxy's unless the
proxy is trusted to set it (docs/operations.md).
"""

from __future__ import annotations

from ..ratelimit import TokenBucket


class LoginGuard:
    def __init__(self, per_user_burst: int, per_user_per_min: float,
                 per_ip_burst: int, per_ip_per_min: float, max_entries: int = 100_000):
        self._limits = {"user": (per_user_per_min / 60.0, per_user_burst),
                        "ip": (per_ip_per_min / 60.0, per_ip_burst)}
        self._buckets: dict[str, dict[str, TokenBucket]] = {"user": {}, "ip": {}}
        self.max_entries = max_entries

    def retry_after(self, username: str, ip: str, now: float) -> float:
        """0.0 if a login attempt may go ahead, else seconds until one may."""
        wait = 0.0
        for kind, key in (("user", username.lower()), ("ip", ip)):
            b = self._buckets[kind].get(key)
            if b is not None:
                b.take(now, 0.0)  # refill to now without spending
                if b.tokens < 1.0:
                    wait = max(wait, b.retry_after_s())
        return wait

    def failed(self, username: str, ip: str, now: float) -> None:
        for kind, key in (("user", username.lower()), ("ip", ip)):
            table = self._buckets[kind]
            b = table.get(key)
            if b is None:
                if len(table) >= self.max_entries:
                    self._prune(table, now)
                rate, burst = self._limits[kind]
                b = table[key] = TokenBucket(rate, burst, now)
            b.take(now)

    def succeeded(self, username: str) -> None:
        """A correct password clears the account's failures (not the address's)."""
        self._buckets["user"].pop(username.lower(), None)

    def _prune(self, table: dict[str, TokenBucket], now: float) -> None:
        for key in [k for k, b in table.items() if b.take(now, 0.0) and b.tokens >= b.burst]:
            del table[key]
        while len(table) >= self.max_entries:
            del table[next(iter(table))]  # dicts keep insertion order: the oldest first

    def __len__(self) -> int:
        return sum(len(t) for t in self._buckets.values())
