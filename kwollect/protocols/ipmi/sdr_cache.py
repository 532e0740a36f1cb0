"""The SDR caches of the BMCs one `ipmi-sensors` pool reads, in a private directory.

FreeIPMI keeps each BMC's SDR (its list of sensors) in a cache file so that a poll does not
download it again; ``--sdr-cache-recreate`` rebuilds a file only when the BMC reports a newer
SDR or the file is invalid.  A failed poll deletes that BMC's file so the next one rebuilds it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile

from kwollect.protocols.ipmi.url import Target

# FreeIPMI names a BMC's cache file after the short local host name and the BMC's -h string.
_LOCAL_NAME = socket.gethostname().split(".", 1)[0] or "localhost"


class SdrCache:
    """A directory (mode 0700, made on first use) holding FreeIPMI's SDR cache files."""

    def __init__(self) -> None:
        self._directory: str | None = None

    def directory(self) -> str:
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="kwollect-ipmi-")
        return self._directory

    def file(self, target: Target) -> str:
        """Where FreeIPMI keeps `target`'s SDR cache inside our cache directory."""
        return os.path.join(self.directory(), ".freeipmi", "sdr-cache",
                            f"sdr-cache-{_LOCAL_NAME}.{target.address}")

    def forget(self, target: Target) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file(target))

    def remove(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
