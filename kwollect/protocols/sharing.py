"""One object per key shared by all its users, counted, closed by the last one to leave.

The scheduler shares a collector between the groups (periods) of one target, Modbus shares a
TCP connection between the collectors of one gateway, IPMI shares an ``ipmi-sensors`` pool
between the BMCs with the same credentials: all three are this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedRegistry(dict[K, V], Generic[K, V]):
    """The shared objects by key (it is a dict of them), with how many users each has.

    `acquire` makes the object on first use; `release` returns it when its last user left
    (it is then no longer in the registry) so the caller closes it, the way it closes
    (synchronously, or awaited, or later).
    """

    def __init__(self) -> None:
        super().__init__()
        self._users: dict[K, int] = {}

    def acquire(self, key: K, make: Callable[[], V]) -> V:
        value = self.get(key)
        if value is None:
            value = self[key] = make()
        self._users[key] = self._users.get(key, 0) + 1
        return value

    def release(self, key: K) -> V | None:
        """One user less; the object when that was its last user, else None."""
        users = self._users.get(key, 0) - 1
        if users > 0:
            self._users[key] = users
            return None
        self._users.pop(key, None)
        return self.pop(key, None)

    def users(self, key: K) -> int:
        return self._users.get(key, 0)

    def clear(self) -> None:
        super().clear()
        self._users.clear()
