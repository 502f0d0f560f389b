"""Throttling of logins and sign-ups, pure (the caller passes the clock reading).

Password guessing is slowed per account and per client address (an attacker spreading guesses over
many addresses still meets the account's bucket; one address trying many usernames meets its own).
Only *failed* logins take tokens, so a crowd of real users behind one address logging in correctly is
never throttled. A throttled login is refused before the password is checked: no scrypt work is
spent on it.

The account's bucket cannot lock its owner out: a login naming a device the account already has (a
``device_id`` an earlier successful login issued to that user, recorded in the store; the route
checks it) is counted in a bucket of its own, per (username, device), instead of the account's. A
stranger does not know the owner's device ids, so their failures drain the account's bucket, which
then holds back new devices only. What still throttles the owner: the per-address bucket of their
own address (the proxy's, unless ``server.trusted_proxies`` names it), and their own device's bucket
if they mistype their password there often.

Sign-ups (:class:`BucketTable` per address) take a token per attempt.

Resources: each table of buckets is capped at ``max_entries``; when one is full, buckets that have
refilled completely (they carry no information) are dropped, and if none has, the oldest go.
"""

from __future__ import annotations

from ..ratelimit import TokenBucket


class BucketTable:
    """Token buckets by key, all with one rate and burst, bounded in number."""

    def __init__(self, rate_per_s: float, burst: int, max_entries: int = 100_000):
        self.rate, self.burst, self.max_entries = rate_per_s, burst, max_entries
        self._buckets: dict[str, TokenBucket] = {}

    def retry_after(self, key: str, now: float) -> float:
        """0.0 if ``key`` has a token now, else seconds until it has one (nothing is spent)."""
        b = self._buckets.get(key)
        if b is None:
            return 0.0
        b.take(now, 0.0)  # refill to now without spending
        return 0.0 if b.tokens >= 1.0 else b.retry_after_s()

    def take(self, key: str, now: float) -> float:
        """Spend a token of ``key``: 0.0 if there was one, else seconds until there is."""
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_entries:
                self._prune(now)
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return 0.0 if b.take(now) else b.retry_after_s()

    def clear(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _prune(self, now: float) -> None:
        table = self._buckets
        for key in [k for k, b in table.items() if b.take(now, 0.0) and b.tokens >= b.burst]:
            del table[key]
        while len(table) >= self.max_entries:
            del table[next(iter(table))]  # dicts keep insertion order: the oldest first

    def __len__(self) -> int:
        return len(self._buckets)


class LoginGuard:
    def __init__(self, per_user_burst: int, per_user_per_min: float,
                 per_ip_burst: int, per_ip_per_min: float, max_entries: int = 100_000):
        self._user = BucketTable(per_user_per_min / 60.0, per_user_burst, max_entries)
        self._device = BucketTable(per_user_per_min / 60.0, per_user_burst, max_entries)
        self._ip = BucketTable(per_ip_per_min / 60.0, per_ip_burst, max_entries)

    def _account(self, username: str, device: str | None) -> tuple[BucketTable, str]:
        name = username.lower()
        return (self._user, name) if device is None else (self._device, f"{name}\x00{device}")

    def retry_after(self, username: str, ip: str, now: float, device: str | None = None) -> float:
        """0.0 if a login attempt may go ahead, else seconds until one may. ``device``: a device
        the account is known to have (module docstring), or None."""
        table, key = self._account(username, device)
        return max(table.retry_after(key, now), self._ip.retry_after(ip, now))

    def failed(self, username: str, ip: str, now: float, device: str | None = None) -> None:
        table, key = self._account(username, device)
        table.take(key, now)
        self._ip.take(ip, now)

    def succeeded(self, username: str, device: str | None = None) -> None:
        """A correct password clears the failures of the bucket it was counted in (not the address's)."""
        table, key = self._account(username, device)
        table.clear(key)

    def __len__(self) -> int:
        return len(self._user) + len(self._device) + len(self._ip)
