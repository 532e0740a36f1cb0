"""Several kwollectors on one metrics.d: the `shard` option (`i/n`) splits the targets.

Every kwollector reads the same descriptions; shard `i/n` keeps those whose target (the
``scheme://host:port`` of the URL, so every metric of one device endpoint stays on one
process and shares its connection) falls in bucket `i` of `n`.  The shards of one `n`
are disjoint and together hold every target once, whatever machine they run on: the
bucket depends on nothing but the target's name and `n`.

The bucket is Lamping and Veach's jump consistent hash ("A Fast, Minimal Memory,
Consistent Hash Algorithm", 2014) of a BLAKE2b digest of the name: going from n to n+1
shards moves only the ~1/(n+1) of the targets that the new shard must take, and going
back moves only the removed shard's targets (a modulo would move ~n/(n+1) of them, and
each moved target loses one poll or gets polled twice while the processes restart).
Jump hash needs no state and no list of members, which rendezvous hashing would; its
cost is one loop of ln(n) steps per target, at load time only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from kwollect.errors import KwollectError
from kwollect.model import MetricDescription
from kwollect.protocols.url import target_name

_MASK64 = (1 << 64) - 1


class ShardError(KwollectError, ValueError):
    """A `shard` option that is not `i/n` with 1 <= i <= n."""


def jump_hash(key: int, buckets: int) -> int:
    """The bucket, in range(buckets), of a 64-bit key (jump consistent hash)."""
    if buckets <= 0:
        raise ValueError(f"buckets must be positive, got {buckets}")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & _MASK64
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def key_hash(name: str) -> int:
    """A stable 64-bit hash of a target name (Python's hash() changes per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


def shard_key(desc: MetricDescription) -> str:
    """What a description is sharded by: its target, without credentials or path."""
    return target_name(desc.url)


def group_of(target: str, count: int) -> int:
    """The 0-based group, of `count`, of a target (shards and leased failover groups)."""
    return jump_hash(key_hash(target), count)


def bucket_of(target: str, count: int) -> int:
    """The 1-based shard of `count` that polls `target`."""
    return group_of(target, count) + 1


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`; `Shard(1, 1)` holds every target."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: object) -> Shard:
        """`i/n` (1 <= i <= n); an empty value means the whole set (1/1)."""
        if text is None or text == "":
            return cls()
        index, slash, count = str(text).strip().partition("/")
        try:
            if not slash:
                raise ValueError
            shard = cls(int(index), int(count))
        except ValueError:
            raise ShardError(f"shard must be i/n (e.g. 1/3), got {text!r}") from None
        if not 1 <= shard.index <= shard.count:
            raise ShardError(f"shard {text!r}: i must be between 1 and n")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, target: str) -> bool:
        return self.whole or bucket_of(target, self.count) == self.index

    def select(self, descriptions: Iterable[MetricDescription]) -> list[MetricDescription]:
        """The descriptions whose target this shard polls, in their order."""
        return [d for d in descriptions if self.owns(shard_key(d))]
