"""A durable FIFO of byte records on disk: where the writer parks batches the database refused.

Records are appended to segment files (``<16-digit sequence>.seg``) in a spool directory and
read back in the same order.  Each record is framed as::

    magic "KWS1" | payload length (u32 LE) | CRC-32 of the payload (u32 LE) | payload

so a record cut short by a crash (a torn tail) or damaged on disk is detected on reading,
logged and skipped; reading resumes at the next intact record of the segment.  A segment is
deleted once every record in it was read and acknowledged (`done`), so what survives a crash
or a restart is exactly what was not yet acknowledged: a new `Spool` on the same directory
reads it again (the caller must tolerate a record it already handled, e.g. by a batch id).

What the directory holds but cannot be used (a directory or special file named like a
segment, a segment this user cannot read) is logged, naming it and what to do, and left
in place untouched; the spool works on with the rest, and numbers its new segments after
it, so that restarting once it is fixed replays it.

Only one process may use a directory at a time (an flock on ``.lock``).  Appends go to the
page cache at once (one write per record); `sync` makes them durable, and `detach_sync`
returns the same work as a function to run in a worker thread every second or so, so that
fsync never stalls an event loop.  The total size on disk is bounded: `append` refuses a
record that would exceed `max_bytes`; space is freed a whole segment at a time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kwollect.errors import KwollectError

MAGIC = b"KWS1"
HEADER = struct.Struct("<4sII")
SUFFIX = ".seg"
MAX_SEGMENT_BYTES = 8 << 20
MIN_SEGMENT_BYTES = 64 << 10

log = logging.getLogger(__name__)


class SpoolError(KwollectError, OSError):
    """The spool directory cannot be used (not writable, locked by another process...)."""


@dataclass(eq=False)
class _Segment:
    seq: int
    path: Path
    size: int = 0
    records: int = 0
    """Records not yet acknowledged (read or not)."""
    read_offset: int = 0
    writable: bool = False


@dataclass(frozen=True, slots=True)
class SpoolRef:
    """Identifies a record handed out by `Spool.read`, to acknowledge it with `Spool.done`."""

    segment: _Segment
    offset: int


class Spool:
    """Append-only segment files read back in order; see the module docstring."""

    def __init__(self, directory: str | Path, max_bytes: int,
                 logger: logging.Logger = log,
                 on_damaged: Callable[[bytes, int], None] | None = None) -> None:
        """`on_damaged(payload, length)` is told of each torn or corrupt record skipped:
        the bytes read of its payload and the length its header declared (``b"", 0`` when
        even the header is gone), so the owner can count the rows it held."""
        self.directory = Path(directory)
        self._on_damaged = on_damaged
        self.max_bytes = max_bytes
        self.segment_bytes = min(MAX_SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, max_bytes // 8))
        self._log = logger
        self._segments: deque[_Segment] = deque()
        self._size = 0
        self._records = 0
        self._next_seq = 0
        self._fd: int | None = None
        self._unsynced: list[int] = []
        self._dirty = False
        self._dir_dirty = False
        self._lock_fd: int | None = None
        self.corrupt_records = 0
        self.unreadable_segments = 0
        """Segments left on disk because they could not be read (see the log)."""
        self.unreadable_records = 0
        """Records in segments that became unreadable while this process used them."""

    # --- state ------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes on disk in segment files (freed a whole segment at a time)."""
        return self._size

    @property
    def records(self) -> int:
        """Records appended or found on disk and not yet acknowledged."""
        return self._records

    def is_empty(self) -> bool:
        """True when every record was read and acknowledged (no segment left)."""
        return not self._segments

    # --- life cycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory and index the segments an earlier process left."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool directory {self.directory}: {exc.strerror}: create it, "
                             "writable by the service user, or set spool_dir to such a "
                             "directory") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolError(f"spool directory {self.directory} is in use by another "
                             f"process") from None
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            stem = path.name[:-len(SUFFIX)]
            if not (stem.isascii() and stem.isdigit()):
                continue
            self._next_seq = max(self._next_seq, int(stem) + 1)
            try:
                if not path.is_file():
                    self._log.error("spool %s: not a regular file, left alone: move it out of "
                                    "the spool directory", path)
                    continue
                segment = _Segment(int(stem), path, path.stat().st_size)
                segment.records = self._count_records(path)
            except OSError as exc:
                self._log.error("spool %s: cannot be read (%s), left in place: give the "
                                "service user read and write access to it and restart to "
                                "replay it", path, exc.strerror)
                self.unreadable_segments += 1
                continue
            if segment.size == 0:
                path.unlink(missing_ok=True)
                continue
            self._segments.append(segment)
            self._size += segment.size
            self._records += segment.records

    def close(self) -> None:
        """Make everything durable and release the directory."""
        self.sync()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for segment in self._segments:
            segment.writable = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _count_records(path: Path) -> int:
        """Records in a segment by walking the headers (payloads are checked on reading)."""
        count = 0
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            offset = 0
            while offset + HEADER.size <= size:
                magic, length, _ = HEADER.unpack(file.read(HEADER.size))
                if magic != MAGIC:
                    break
                offset += HEADER.size + length
                count += 1
                file.seek(offset)
        return max(count, 1) if size else 0

    # --- writing ------------------------------------------------------------------------

    def append(self, payload: bytes) -> bool:
        """Append one record; False (nothing written) when it would exceed `max_bytes`.

        Raises OSError when the file system refuses the write (the record is not kept).
        """
        record_size = HEADER.size + len(payload)
        if self._size + record_size > self.max_bytes:
            return False
        segment = self._segments[-1] if self._segments else None
        if segment is None or not segment.writable or (
                segment.size and segment.size + record_size > self.segment_bytes):
            segment = self._new_segment()
        data = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        assert self._fd is not None
        try:
            written = os.write(self._fd, data)
        except OSError:
            os.ftruncate(self._fd, segment.size)
            raise
        if written != len(data):  # disk full after a partial write: undo it
            os.ftruncate(self._fd, segment.size)
            raise OSError(f"spool segment {segment.path}: short write ({written} of "
                          f"{len(data)} bytes)")
        segment.size += record_size
        segment.records += 1
        self._size += record_size
        self._records += 1
        self._dirty = True
        return True

    def _new_segment(self) -> _Segment:
        if self._fd is not None:  # its last appends are synced by the next `sync`
            if self._dirty:
                self._unsynced.append(self._fd)
                self._dirty = False
            else:
                os.close(self._fd)
            self._fd = None
            self._segments[-1].writable = False
        path = self.directory / f"{self._next_seq:016d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        segment = _Segment(self._next_seq, path, writable=True)
        self._next_seq += 1
        self._segments.append(segment)
        self._dir_dirty = True
        return segment

    def sync(self) -> None:
        """fsync what was appended since the last sync (and new directory entries)."""
        job = self.detach_sync()
        if job is not None:
            job()

    def detach_sync(self) -> Callable[[], None] | None:
        """`sync` as a function to run in a worker thread (None when there is nothing to do).

        It syncs duplicates of the descriptors, so the caller may go on appending, rotate
        or close meanwhile.
        """
        fds, self._unsynced = self._unsynced, []
        if self._dirty and self._fd is not None:
            fds.append(os.dup(self._fd))
        if self._dir_dirty:
            fds.append(os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY))
        self._dirty = self._dir_dirty = False
        if not fds:
            return None

        def run() -> None:
            try:
                for fd in fds:
                    os.fsync(fd)
            finally:
                for fd in fds:
                    os.close(fd)

        return run

    # --- reading ------------------------------------------------------------------------

    def read(self) -> tuple[SpoolRef, bytes] | None:
        """The next unread record in append order, or None when everything was read.

        A segment that cannot be read any more is logged and given up (left on disk).
        """
        for segment in list(self._segments):
            while segment.read_offset < segment.size:
                try:
                    found = self._read_record(segment)
                except OSError as exc:
                    self._give_up(segment, exc)
                    break
                if found is not None:
                    return found
        return None

    def _give_up(self, segment: _Segment, exc: OSError) -> None:
        self._log.error("spool %s: cannot be read any more (%s): %d record(s) left in it "
                        "on disk; give the service user access to it and restart to replay "
                        "them", segment.path, exc.strerror or exc, segment.records)
        self.unreadable_segments += 1
        self.unreadable_records += segment.records
        self._records -= segment.records
        self._size -= segment.size
        segment.records = 0
        if segment.writable:
            assert self._fd is not None
            os.close(self._fd)
            self._fd = None
            self._dirty = False
        self._segments.remove(segment)

    def _read_record(self, segment: _Segment) -> tuple[SpoolRef, bytes] | None:
        offset = segment.read_offset
        damaged, declared = b"", 0
        with open(segment.path, "rb") as file:
            file.seek(offset)
            header = file.read(HEADER.size)
            if len(header) == HEADER.size:
                magic, length, crc = HEADER.unpack(header)
                if magic == MAGIC:
                    payload = file.read(min(length, segment.size - offset - HEADER.size))
                    if len(payload) == length and zlib.crc32(payload) == crc:
                        segment.read_offset = offset + HEADER.size + length
                        return SpoolRef(segment, offset), payload
                    damaged, declared = payload, length
            file.seek(offset + 1)
            rest = file.read(segment.size - offset - 1)
        skip = rest.find(MAGIC)
        resume = segment.size if skip < 0 else offset + 1 + skip
        self._log.warning("spool %s: torn or corrupt record at byte %d, skipped %d bytes%s",
                          segment.path, offset, resume - offset,
                          "" if skip < 0 else f" (resuming at byte {resume})")
        segment.read_offset = resume
        self.corrupt_records += 1
        self._forget(segment)
        if self._on_damaged is not None:
            self._on_damaged(damaged, declared)
        return None

    def done(self, ref: SpoolRef) -> None:
        """Acknowledge a record returned by `read`: it will not be read again."""
        self._forget(ref.segment)

    def _forget(self, segment: _Segment) -> None:
        if segment.records:
            segment.records -= 1
            self._records -= 1
        self._collect()

    def _collect(self) -> None:
        """Delete the leading segments that were read and acknowledged in full."""
        while self._segments:
            segment = self._segments[0]
            if segment.records or segment.read_offset < segment.size:
                return
            if segment.writable:  # the last one: the spool is now empty
                assert self._fd is not None
                os.close(self._fd)
                self._fd = None
                self._dirty = False
            segment.path.unlink(missing_ok=True)
            self._segments.popleft()
            self._size -= segment.size
            self._dir_dirty = True


MEMORY_ONLY = "none"
"""The spool_dir value that asks for no spool (readings held in memory only)."""


def spool_directory(configured: str, program: str, config_file: str = "") -> Path | None:
    """The directory a `spool_dir` option value means; None for memory only.

    Lossless by default: an empty value is systemd's StateDirectory ($STATE_DIRECTORY), else
    a per-user state directory, ``$XDG_STATE_HOME/kwollect/<program>-<config file stem>``
    (``~/.local/state`` when XDG_STATE_HOME is unset), so two collectors of one user with
    different configuration files never share a spool.  Only ``none`` means memory only.
    """
    if configured.strip().lower() == MEMORY_ONLY:
        return None
    if configured:
        return Path(configured)
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "kwollect" / (program + (f"-{Path(config_file).stem}" if config_file else ""))
