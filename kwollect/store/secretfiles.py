"""Files that hold secrets (passwords, the API configuration): written atomically, private.

A secret file is written to a temporary file in the same directory, created with its final
mode (0600, or 0640 for a group such as the collectors' `kwollect`), owned by that group,
flushed to disk, then renamed over the old one: a reader never sees half a file, and a file
that existed before with a looser mode (0644) is replaced, not rewritten in place, so its
old mode never applies to the new secret.
"""

from __future__ import annotations

import contextlib
import grp
import os
import secrets
from pathlib import Path

SERVICE_GROUP = "kwollect"
"""The group of the packaged services (sysusers.d): readers of the secret files."""


def new_secret() -> str:
    """A fresh random password: 43 URL-safe characters (256 bits)."""
    return secrets.token_urlsafe(32)


def default_group() -> str:
    """SERVICE_GROUP when it exists on this machine (the package creates it), else ""."""
    try:
        grp.getgrnam(SERVICE_GROUP)
    except KeyError:
        return ""
    return SERVICE_GROUP


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"group {name!r} does not exist (the package creates "
                         f"{SERVICE_GROUP!r}; or give service_group '')") from None


def write_secret_file(path: str | Path, text: str, group: str = "") -> str:
    """Replace `path` by `text`, mode 0640 with `group` (0600 without); returns the mode
    as text ("0640 root:kwollect") for what the caller reports."""
    path = Path(path)
    gid = group_id(group) if group else -1
    mode = 0o640 if group else 0o600
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as out:
            if gid != -1:
                os.fchown(out.fileno(), -1, gid)
            os.fchmod(out.fileno(), mode)  # the umask may have taken bits away
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename durable too
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    owner = "root" if os.geteuid() == 0 else str(os.geteuid())
    return f"{mode:04o} {owner}:{group}" if group else f"{mode:04o} {owner}"
