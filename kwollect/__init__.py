"""kwollect: lossless collection of out-of-band infrastructure metrics into PostgreSQL."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

__version__ = "2.0.0.dev0"

DISTRIBUTION = "kwollect-pg"
"""Our name on the Python package index: `kwollect` there is the reference Kwollect (1.x,
TimescaleDB-based), a different program.  The commands keep their names."""


def version() -> str:
    """The installed version (from the package metadata; __version__ in a bare checkout)."""
    try:
        return _version(DISTRIBUTION)
    except PackageNotFoundError:
        return __version__
