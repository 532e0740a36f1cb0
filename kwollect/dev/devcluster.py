"""A private, throw-away PostgreSQL cluster for the demo, the tests and the benchmarks.

It runs Debian's PostgreSQL binaries from a temporary directory, listening on a unix
socket in that directory and on a free loopback port.  PostgreSQL refuses to run as root,
so under root the cluster belongs to the `postgres` system user (`runuser`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from kwollect.dev.simulators import free_port

DEFAULT_SETTINGS = {
    "timezone": "UTC",
    "shared_buffers": "512MB",
    "max_connections": "200",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "jit": "off",
}


def find_pg_bindir() -> Path:
    """The newest installed PostgreSQL server binaries (15 or later)."""
    override = os.environ.get("KWOLLECT_PG_BINDIR")
    if override:
        return Path(override)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                        key=lambda p: int(Path(p).parent.parent.name))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise RuntimeError("no PostgreSQL server binaries found (install Debian's postgresql package "
                       "or set KWOLLECT_PG_BINDIR)")


# Extensions that need shared_preload_libraries, in the order they must be loaded (Citus
# first).  They are not Debian packages here: scripts/install-pg-extensions.sh installs them
# from the archives named by KWOLLECT_PG_EXTENSIONS.
PRELOADED_EXTENSIONS = ("citus", "timescaledb")


def installed_extensions(bindir: Path | None = None) -> list[str]:
    """The preloadable extensions whose control file and module are installed for this server."""
    bindir = bindir or find_pg_bindir()
    major = bindir.parent.name
    return [name for name in PRELOADED_EXTENSIONS
            if Path(f"/usr/share/postgresql/{major}/extension/{name}.control").is_file()
            and (bindir.parent / "lib" / f"{name}.so").is_file()]


def missing_extension_reason(name: str) -> str | None:
    """None when `name` is installed, else why not and how to get it (a test's skip reason)."""
    if name in installed_extensions():
        return None
    return (f"{name} is not installed for this PostgreSQL: run scripts/test as root with "
            f"KWOLLECT_PG_EXTENSIONS=<directory of extension archives> "
            f"(.ci/run uses ../shared/pg-extensions when it exists)")


class PrivateCluster:
    """initdb + pg_ctl around a temporary directory; `stop()` removes nothing but the server."""

    def __init__(self, base_dir: str | Path | None = None, port: int | None = None,
                 settings: dict[str, str] | None = None,
                 preload: tuple[str, ...] = (), stock: bool = False) -> None:
        """`preload`: extensions to load at start (those not installed are left out).
        `settings` add to DEFAULT_SETTINGS; with `stock`, they replace them (only what is
        given differs from a stock server: e.g. jit stays on, as on a fresh install)."""
        self.bindir = find_pg_bindir()
        self.base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="kwollect-pg-"))
        self.datadir = self.base / "data"
        self.socket_dir = str(self.base)
        self.port = port or free_port()
        self.settings = {**({} if stock else DEFAULT_SETTINGS), **(settings or {})}
        self.preloaded = [name for name in installed_extensions(self.bindir) if name in preload]
        if self.preloaded:
            self.settings["shared_preload_libraries"] = ",".join(self.preloaded)
            if "citus" in self.preloaded:
                self.settings["citus.enable_statistics_collection"] = "off"
        self._run_as = "postgres" if os.geteuid() == 0 else None

    @property
    def superuser(self) -> str:
        return "postgres"

    def dsn(self, user: str | None = None, database: str = "postgres") -> str:
        """A libpq/asyncpg DSN over the unix socket."""
        return (f"postgresql://{user or self.superuser}@/{database}"
                f"?host={self.socket_dir}&port={self.port}")

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self._run_as, "--", *cmd] if self._run_as else cmd

    def init(self) -> None:
        if (self.datadir / "PG_VERSION").exists():
            return
        self.base.mkdir(parents=True, exist_ok=True)
        if self._run_as:
            pw = pwd.getpwnam(self._run_as)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        os.chmod(self.base, 0o755)
        subprocess.run(self._cmd("initdb", "-D", str(self.datadir), "-U", self.superuser,
                                 "--auth-local=trust", "--auth-host=scram-sha-256",
                                 "-E", "UTF8", "--locale=C.UTF-8"),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> PrivateCluster:
        self.init()
        options = ["-c listen_addresses=127.0.0.1", f"-p {self.port}",
                   f"-k {self.socket_dir}"]
        options += [f"-c {key}={value}" for key, value in self.settings.items()]
        subprocess.run(self._cmd("pg_ctl", "-D", str(self.datadir), "-w", "-t", "60",
                                 "-l", str(self.base / "postgres.log"),
                                 "-o", " ".join(options), "start"),
                       check=True, stdout=subprocess.DEVNULL)
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            subprocess.run(self._cmd("pg_ctl", "-D", str(self.datadir), "-w", "-m", mode, "stop"),
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres", user: str | None = None) -> str:
        """Run SQL with psql as the superuser (or `user`) and return its unaligned output."""
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn(user, database), "-c", sql],
            check=True, capture_output=True, text=True)
        return result.stdout


def start_citus_cluster(workers: int = 2, settings: dict[str, str] | None = None,
                        ) -> list[PrivateCluster]:
    """[coordinator, worker...] of a Citus cluster on 127.0.0.1, running (Citus preloaded,
    not yet set up: `kwollect-setup-db --citus` does that).  The workers trust connections
    from 127.0.0.1, as a private cluster network would; the coordinator keeps password
    authentication for clients, so give it as citus_coordinator by its unix socket
    directory (`socket_dir:port`), where the nodes' connections to it are trusted."""
    nodes: list[PrivateCluster] = []
    try:
        for n in range(workers + 1):
            node = PrivateCluster(settings=settings, preload=("citus",))
            node.init()
            if n:
                hba = node.datadir / "pg_hba.conf"
                hba.write_text("host all all 127.0.0.1/32 trust\n" + hba.read_text())
            nodes.append(node.start())
    except BaseException:
        for node in nodes:
            node.destroy()
        raise
    return nodes
