"""PostgREST-shaped errors: a JSON body {code, details, hint, message} and PostgREST's statuses.

The status of a database error follows PostgREST's documented table (references/errors),
so that clients see the same status whether a site runs PostgREST or kwollect-api.
"""

from __future__ import annotations

import asyncpg
import orjson

from kwollect.errors import KwollectError

# (SQLSTATE prefix, status), most specific first; "other" is 400.
_STATUS_BY_SQLSTATE: tuple[tuple[str, int], ...] = (
    ("08", 503), ("09", 500), ("0L", 403), ("0P", 403),
    ("23503", 409), ("23505", 409), ("25006", 405), ("25", 500), ("28", 403), ("2D", 500),
    ("38", 500), ("39", 500), ("3B", 500), ("40", 500), ("53400", 500), ("53", 503),
    ("54", 500), ("55", 500), ("57", 500), ("58", 500), ("F0", 500), ("HV", 500),
    ("P0001", 400), ("P0", 500), ("XX", 500), ("42883", 404), ("42P01", 404), ("42P17", 500),
)


class ApiError(KwollectError):
    """An error answered to the client; `status` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str, details: str | None = None,
                 hint: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.hint = hint
        self.headers = headers or {}

    def body(self) -> bytes:
        return orjson.dumps({"code": self.code, "details": self.details, "hint": self.hint,
                             "message": self.message})


def status_for_sqlstate(sqlstate: str, authenticated: bool) -> int:
    """PostgREST's mapping; PTxyz raises status xyz; 42501 is 403 with a JWT, 401 without."""
    if sqlstate == "42501":
        return 403 if authenticated else 401
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
        return int(sqlstate[2:])
    for prefix, status in _STATUS_BY_SQLSTATE:
        if sqlstate.startswith(prefix):
            return status
    return 400


def _pgrst_raise(exc: asyncpg.PostgresError) -> ApiError:
    """RAISE SQLSTATE 'PGRST': message and detail are JSON objects (PostgREST's convention)."""
    try:
        body = orjson.loads(exc.message or "")
        extra = orjson.loads(getattr(exc, "detail", None) or "{}")
        status = int(extra["status"])
        headers = {str(k): str(v) for k, v in (extra.get("headers") or {}).items()}
        return ApiError(status, str(body["code"]), str(body["message"]), body.get("details"),
                        body.get("hint"), headers)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return ApiError(500, "PGRST121", "Could not parse JSON in the RAISE SQLSTATE 'PGRST' error",
                        details=exc.message, hint="Use {\"code\": ..., \"message\": ...} as the "
                        "message and {\"status\": ..., \"headers\": {...}} as the detail.")


def from_postgres(exc: asyncpg.PostgresError, authenticated: bool) -> ApiError:
    """The client's view of a database error raised while serving a request.

    Server-side failures (5xx, other than those a function raises on purpose with a PTxxx
    SQLSTATE) are answered without the database's message, detail and hint: they name
    internal objects ('tuple (1,39) in relation "series"'); the caller logs them.
    """
    sqlstate = exc.sqlstate or "XX000"
    if sqlstate == "PGRST":
        return _pgrst_raise(exc)
    if sqlstate == "54001":  # stack depth limit exceeded: the input nests too deeply
        return ApiError(400, sqlstate, "The request is too complex (too deeply nested) for "
                        "the database", hint="Send flatter JSON values.")
    status = status_for_sqlstate(sqlstate, authenticated)
    if status >= 500 and not sqlstate.startswith("PT"):
        return ApiError(status, sqlstate, f"Database error (SQLSTATE {sqlstate})",
                        hint="The details are in kwollect-api's log.")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return ApiError(status, sqlstate, exc.message or str(exc),
                    getattr(exc, "detail", None) or None, getattr(exc, "hint", None) or None,
                    headers)


def unavailable(exc: BaseException) -> ApiError:
    """The database cannot be reached (PGRST001, 503); its address stays in the log."""
    return ApiError(503, "PGRST001", "Database client error. Retrying the connection.",
                    details=type(exc).__name__)
