"""kwollect-api: a PostgREST-compatible HTTP gateway to schema api that streams results."""

from kwollect.gateway.app import main

__all__ = ["main"]
