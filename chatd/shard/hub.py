"""The local connection registry of one shard: which sessions of which users are here."""

from __future__ import annotations


class Hub:
    def __init__(self):
        self._by_user: dict[int, set] = {}
        self.count = 0

    def add(self, session) -> None:
        self._by_user.setdefault(session.user_id, set()).add(session)
        self.count += 1

    def remove(self, session) -> None:
        sessions = self._by_user.get(session.user_id)
        if sessions and session in sessions:
            sessions.discard(session)
            self.count -= 1
            if not sessions:
                del self._by_user[session.user_id]

    def sessions_of(self, user_id: int):
        return self._by_user.get(user_id, ())

    def all_sessions(self) -> list:
        return [s for group in self._by_user.values() for s in group]
