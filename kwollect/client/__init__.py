"""What experimenters run on their side of the HTTP API: a Python client and the
`kwollect get` and `kwollect plot` commands."""

from kwollect.client.api import ApiCallError, Client

__all__ = ["ApiCallError", "Client"]
