"""The spool on a directory an operator, a crash or a disk left in a bad state: every case is
a one-line error naming the file and what to do, never a traceback, and what can be read
is read."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from kwollect.collect.kwollector import main as kwollector_main
from kwollect.store.spool import Spool, SpoolError

NOBODY = 65534


def filled(directory: Path, payloads: list[bytes]) -> None:
    spool = Spool(directory, 1 << 20)
    spool.open()
    for payload in payloads:
        assert spool.append(payload)
    spool.close()


def drain(spool: Spool) -> list[bytes]:
    out = []
    while (found := spool.read()) is not None:
        ref, payload = found
        spool.done(ref)
        out.append(payload)
    return out


def as_unprivileged(check: Callable[[], None]) -> None:
    """Run `check` as a user without root's right to read any file (in a child if root)."""
    if os.geteuid() != 0:
        check()
        return
    pid = os.fork()
    if pid == 0:  # the child: drop root, run, report by exit status only
        status = 1
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            check()
            status = 0
        except BaseException as exc:  # reported to the parent by the status
            os.write(2, f"as_unprivileged: {exc!r}\n".encode())
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged check failed (see stderr)"


def test_directory_named_like_a_segment_is_left_alone(tmp_path, caplog) -> None:
    directory = tmp_path / "spool"
    filled(directory, [b"one", b"two"])
    odd = directory / "0000000000000007.seg"
    odd.mkdir()
    spool = Spool(directory, 1 << 20)
    with caplog.at_level(logging.ERROR):
        spool.open()
    assert f"spool {odd}: not a regular file, left alone" in caplog.text
    assert spool.append(b"three")
    assert drain(spool) == [b"one", b"two", b"three"]
    spool.close()
    assert odd.is_dir()  # untouched, and new segments are numbered after it
    assert not (directory / "0000000000000008.seg").exists()  # read in full: deleted


def test_unreadable_segment_is_left_in_place_and_the_rest_used(caplog) -> None:
    base = Path(tempfile.mkdtemp(prefix="kw-spool-"))  # reachable by the unprivileged user
    base.chmod(0o755)
    directory = base / "spool"
    filled(directory, [b"kept"])
    (first,) = sorted(directory.glob("*.seg"))
    locked = directory / "0000000000000005.seg"
    locked.write_bytes(first.read_bytes())
    locked.chmod(0)
    if os.geteuid() == 0:
        for path in (directory, directory / ".lock", first):
            os.chown(path, NOBODY, NOBODY)

    def check() -> None:
        spool = Spool(directory, 1 << 20)
        spool.open()
        assert spool.unreadable_segments == 1
        assert spool.append(b"new")
        assert drain(spool) == [b"kept", b"new"]
        spool.close()
        assert locked.exists() and stat.S_IMODE(locked.stat().st_mode) == 0

    try:
        with caplog.at_level(logging.ERROR):
            as_unprivileged(check)
        assert [p.name for p in sorted(directory.glob("*.seg"))] == [locked.name]
    finally:
        shutil.rmtree(base)


def test_segment_removed_while_in_use_is_given_up_and_counted(tmp_path, caplog) -> None:
    directory = tmp_path / "spool"
    filled(directory, [b"lost-1", b"lost-2"])
    spool = Spool(directory, 1 << 20)
    spool.open()
    assert spool.append(b"later")  # a new segment: the old one is read-only now
    (old, _) = sorted(directory.glob("*.seg"))
    old.unlink()  # an operator's cleanup, or a disk that lost it
    with caplog.at_level(logging.ERROR):
        assert drain(spool) == [b"later"]
    assert "cannot be read any more" in caplog.text and "2 record(s)" in caplog.text
    assert (spool.unreadable_records, spool.records, spool.is_empty()) == (2, 0, True)
    spool.close()


def test_spool_dir_that_cannot_be_created_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "metrics.d").mkdir()
    (tmp_path / "file").write_text("not a directory")
    spool_dir = tmp_path / "file" / "spool"
    with pytest.raises(SpoolError, match="create it, writable by the service user"):
        Spool(spool_dir, 1 << 20).open()
    code = kwollector_main(["--metrics_dir", str(tmp_path / "metrics.d"), "--spool_dir",
                            str(spool_dir), "--db_host", "127.0.0.1", "--db_port", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"kwollector: spool directory {spool_dir}: Not a directory")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
