"""The root of every error kwollect raises on purpose.

Callers that must survive anything a device, a file or the database does catch
`KwollectError`; timeouts and unreachable targets also derive from the built-in
`TimeoutError` and `ConnectionError`, so code written against the standard library (asyncio's
`wait_for`, socket errors) catches them without knowing kwollect.
"""

from __future__ import annotations


class KwollectError(Exception):
    """Something kwollect refused or could not do; the message names what and where."""


class TargetTimeout(KwollectError, TimeoutError):
    """A device (or the database) gave no answer within its deadline."""


class TargetUnreachable(KwollectError, ConnectionError):
    """A device (or the database) refused or dropped the connection."""
