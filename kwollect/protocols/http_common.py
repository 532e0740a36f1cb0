"""HTTP plumbing shared by the HTTP-based protocols (Prometheus exporters, JSON/Redfish APIs).

A metric URL names the resource, the credentials and a few kwollect options; this module
turns it into an `HttpTarget` (the hashable key of the protocol registry) and reads the
target with one keep-alive aiohttp session.

Options common to every HTTP-based scheme, given as query parameters of the metric URL
(values are percent-decoded; every other query parameter is sent to the server unchanged):

- ``bearer_file=/abs/path``: send ``Authorization: Bearer <token>``, the token being the
  content of that file (stripped). The file is read at every request, so a rotated token is
  picked up, and the token never appears in metric descriptions or config dumps.
- ``ca_file=/abs/path`` (https only): PEM file of the CA(s) trusted for the server
  certificate, instead of the system store.
- ``insecure=1`` (https only): do not verify the server certificate at all.
- ``max_bytes=N``: the largest answer read, in bytes (default 16 MiB, about 250,000
  exposition lines); a longer one is an error naming the limit and this option, and what
  came of it is discarded.  It bounds the memory and CPU one target can take from the
  others: a 1M-line exposition once cost 1.17 GB and 8,400 missed ticks of other targets.

Basic authentication is ``user:password@`` in the URL (percent-decoded); it cannot be
combined with ``bearer_file``. Redirects are not followed: a 3xx answer is an error naming
the new location, so credentials never travel to a host the description does not name.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp

from kwollect.errors import KwollectError
from kwollect.protocols.url import (
    Option,
    Secret,
    UrlParts,
    absolute_path,
    flag,
    integer,
    read_options,
    split_url,
)

DEFAULT_MAX_BYTES = 16 << 20
_READ_CHUNK = 256 << 10
_COMMON_OPTIONS = (Option("bearer_file", absolute_path), Option("ca_file", absolute_path),
                   Option("insecure", flag), Option("max_bytes", integer(1, 1 << 40)))


class FetchError(KwollectError):
    """An HTTP target could not be read; the message names the target, never a password."""


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """Everything needed to GET one resource; equal targets share one request per period."""

    url: str
    """The URL requested (no credentials, no kwollect options): safe to log."""
    username: str | None = None
    password: Secret | None = None
    bearer_file: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES

    @property
    def label(self) -> str:
        return self.url

    def __str__(self) -> str:
        return self.url


def read_http_url(url: str, schemes: tuple[str, str], what: str,
                  own: Sequence[Option[Any]]) -> tuple[UrlParts, dict[str, Any], list[str]]:
    """Split an HTTP-based metric URL (`schemes`: the http one, then the https one).

    Returns its parts, the kwollect options found in the query (the common ones and `own`)
    and the raw query items to send to the server.  Raises ValueError naming what is wrong.
    """
    parts = split_url(url, schemes, what, {schemes[0]: 80, schemes[1]: 443})
    options, forwarded = read_options(parts, (*_COMMON_OPTIONS, *own), forward_unknown=True)
    return parts, options, forwarded


def http_target(parts: UrlParts, secure: bool, path: str,
                options: dict[str, Any], forwarded: Collection[str]) -> HttpTarget:
    """Build the target from a parsed metric URL (see `read_http_url`).

    Raises ValueError naming what is wrong.
    """
    host = f"[{parts.host}]" if ":" in parts.host else parts.host
    url = f"{'https' if secure else 'http'}://{host}:{parts.port}{path}"
    if forwarded:
        url += "?" + "&".join(forwarded)
    if not secure and ("ca_file" in options or "insecure" in options):
        raise parts.error("ca_file and insecure only apply to https URLs")
    if "bearer_file" in options and parts.username is not None:
        raise parts.error("give either user:password@ (basic auth) or bearer_file, not both")
    return HttpTarget(url, parts.username, parts.password, options.get("bearer_file"),
                      options.get("ca_file"), options.get("insecure", False),
                      options.get("max_bytes", DEFAULT_MAX_BYTES))


class Response(NamedTuple):
    body: bytes
    content_type: str
    """Media type without parameters, lower case (e.g. ``text/plain``)."""
    start_ns: int
    """Wall-clock time just before the request was sent."""
    end_ns: int
    """Wall-clock time once the whole body was read."""


class HttpClient:
    """One keep-alive session to one target, made on first use (it needs the running loop)."""

    def __init__(self, target: HttpTarget, timeout: float, what: str,
                 headers: dict[str, str] | None = None) -> None:
        self.target = target
        self._timeout = timeout
        self._what = what
        self._headers = headers or {}
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        target = self.target
        ssl_option: ssl.SSLContext | bool = True
        if target.url.startswith("https:"):
            try:
                context = ssl.create_default_context(cafile=target.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise FetchError(f"{self._what} {target}: cannot load ca_file "
                                 f"{target.ca_file}: {exc}") from exc
            if target.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            ssl_option = context
        headers = dict(self._headers)
        if target.username is not None:
            password = target.password.reveal() if target.password else ""
            credentials = f"{target.username}:{password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_option), headers=headers,
            timeout=aiohttp.ClientTimeout(total=self._timeout))

    def _auth_headers(self) -> dict[str, str] | None:
        if self.target.bearer_file is None:
            return None
        try:
            token = Path(self.target.bearer_file).read_text().strip()
        except OSError as exc:
            raise FetchError(f"{self._what} {self.target}: cannot read bearer_file: "
                             f"{exc}") from exc
        return {"Authorization": f"Bearer {token}"}

    async def get(self) -> Response:
        """GET the target; any failure raises FetchError naming the target."""
        if self._session is None:
            self._session = self._open()
        headers = self._auth_headers()
        where = f"{self._what} {self.target}"
        start_ns = time.time_ns()
        try:
            async with self._session.get(self.target.url, headers=headers,
                                         allow_redirects=False) as resp:
                if resp.status != 200:
                    detail = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
                    if "Location" in resp.headers:
                        detail += f" to {resp.headers['Location']} (redirects are not followed)"
                    raise FetchError(f"{where}: {detail}")
                body = await self._read_bounded(resp, where)
                content_type = resp.content_type
        except TimeoutError as exc:
            raise FetchError(f"{where}: no complete answer within {self._timeout:g} s") from exc
        except aiohttp.ClientError as exc:
            raise FetchError(f"{where}: {type(exc).__name__}: {exc}") from exc
        return Response(body, content_type, start_ns, time.time_ns())

    async def _read_bounded(self, resp: aiohttp.ClientResponse, where: str) -> bytes:
        """The body, or FetchError once it grows past the target's max_bytes."""
        limit = self.target.max_bytes
        too_long = (f"{where}: answer longer than {limit} bytes (max_bytes): the target "
                    f"serves too much, or raise max_bytes=<bytes> in its URL")
        if resp.content_length is not None and resp.content_length > limit:
            raise FetchError(too_long)
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise FetchError(too_long)
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
