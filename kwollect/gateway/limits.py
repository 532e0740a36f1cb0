"""Bounds on what a request may hold, checked before anything reaches PostgreSQL.

Each bound answers a fault seen when the API was attacked (issue 10): bodies read whole
before the 401, 60 MB parameters sent to the database, JSON nested deep enough to exhaust
PostgreSQL's stack (500), undecodable header bytes (500), reserved role names in tokens.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from kwollect.gateway.errors import ApiError

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_EMPTY_PAIR = re.compile(rb"\{\}|\[\]")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
# Names SET ROLE treats specially, or that are not a login's to take: "none" would reset
# the role to the gateway's own login.
_RESERVED_ROLES = frozenset({"none", "public", "current_user", "current_role", "session_user",
                             "default", "all"})
NAMEDATALEN = 63


def json_too_deep(text: str | bytes | bytearray, limit: int) -> bool:
    """True when JSON `text` nests arrays/objects more than `limit` levels deep.

    C-speed passes only (regex and bytes.translate): strings are removed, then everything
    but brackets, then each pass removes the innermost empty pairs; whatever is left after
    `limit` passes is deeper than `limit`.  A flat array of a million rows takes two passes.
    Malformed JSON is left for the JSON parser to report.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    data = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        reduced = _EMPTY_PAIR.sub(b"", data)
        if not reduced or reduced == data:
            return False
        data = reduced
    return _EMPTY_PAIR.search(data) is not None


# Scanning costs about 20 times the text's size in transient memory (regex pieces):
# measured 1.2 GB for a 60 MB body.  Texts over this size (bodies of writers only: an
# anonymous body is at most kwollect-max-anon-body-bytes) are left to PostgreSQL, whose
# stack depth error is answered as a 400 too (errors.from_postgres).
DEPTH_SCAN_MAX = 1024 * 1024


def check_json_depth(name: str, text: str | bytes | bytearray, limit: int) -> None:
    if len(text) <= DEPTH_SCAN_MAX and json_too_deep(text, limit):
        raise ApiError(400, "PGRST102", f"{name} nests JSON more than {limit} levels deep",
                       hint=f"kwollect-api accepts JSON nested at most {limit} levels "
                            "(kwollect-max-json-depth).")


def check_headers(headers: Iterable[tuple[str, str]]) -> None:
    """400 for header names or values that are not UTF-8 (aiohttp keeps them as surrogates)."""
    for name, value in headers:
        try:
            name.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "PGRST100", "A request header is not valid UTF-8",
                           details=name.encode("utf-8", "backslashreplace").decode()) from None


def check_role_name(role: str) -> bool:
    """Whether a JWT role claim may be used with SET ROLE."""
    return (bool(role) and role.lower() not in _RESERVED_ROLES
            and not role.lower().startswith("pg_") and "\x00" not in role
            and len(role.encode("utf-8", "surrogatepass")) <= NAMEDATALEN
            and role.isprintable())


def too_large(what: str, limit: int, key: str) -> ApiError:
    return ApiError(413, "PGRST413", f"{what} is larger than {limit} bytes",
                    hint=f"The limit is kwollect-api's {key} setting.")


EXPORT_RETRY_AFTER_S = 5


class ExportCap:
    """Streamed responses (exports) at once, per role and per client address.

    A response is an export from the moment its output outgrows kwollect-hold-bytes (the
    status line is not sent yet, so a refusal is still a clean 429) until it ends, its
    slow reader included.  Small answers never count and are never refused: while one
    role's exports hold their connections (a stalled reader's query waits for room in its
    spool), the rest of the pool serves everyone else (issue 10, item 5).
    """

    def __init__(self, per_role: int, per_client: int) -> None:
        self.per_role = per_role
        self.per_client = per_client
        self._roles: Counter[str] = Counter()
        self._clients: Counter[str] = Counter()

    def enter(self, role: str, client: str) -> None:
        """Count one more export, or raise the 429 that says which cap is reached."""
        if self.per_client and self._clients[client] >= self.per_client:
            raise self._refusal("this client address", self.per_client,
                                "kwollect-max-exports-per-client")
        if self.per_role and self._roles[role] >= self.per_role:
            raise self._refusal(f"role {role}", self.per_role, "kwollect-max-exports-per-role")
        self._roles[role] += 1
        self._clients[client] += 1

    def leave(self, role: str, client: str) -> None:
        for counter, key in ((self._roles, role), (self._clients, client)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    @staticmethod
    def _refusal(who: str, cap: int, key: str) -> ApiError:
        return ApiError(429, "KW429", f"{cap} large responses are already being sent to {who}",
                        hint=f"Retry when one has ended; the cap is kwollect-api's {key}.",
                        headers={"Retry-After": str(EXPORT_RETRY_AFTER_S)})
