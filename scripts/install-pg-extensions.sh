#!/usr/bin/env bash
# Installs the PostgreSQL extension archives (TimescaleDB, Citus, ...) of the directory named
# by $KWOLLECT_PG_EXTENSIONS, for the tests and benchmarks of the storages that use them.
# The directory holds NAME-VERSION-pg15-bookworm-amd64.tar.gz archives with their .sha256
# and an install-ext.sh that checks and extracts one (see ../shared/pg-extensions/README.md);
# nothing of those extensions lives in this repository.
#
# Each archive is installed once (skipped when its extension's control file is there).  An
# archive built against a newer postgresql-15 than the installed one needs that version
# (a server module built on 15.20 does not load into 15.18): as root, postgresql-15 is
# upgraded first.  Without root, or without the directory, it only says what it skips: the
# tests of those storages then skip with that reason.
set -euo pipefail

dir=${KWOLLECT_PG_EXTENSIONS:-}
[ -n "$dir" ] || exit 0
if [ ! -d "$dir" ]; then
    echo "pg-extensions: $dir is not a directory; storages needing extensions will be skipped" >&2
    exit 0
fi
installer="$dir/install-ext.sh"
if [ ! -f "$installer" ]; then
    echo "pg-extensions: $installer is missing; nothing installed" >&2
    exit 0
fi
extdir=/usr/share/postgresql/15/extension

pg_version() { dpkg-query -W -f='${Version}' postgresql-15 2>/dev/null || true; }

for archive in "$dir"/*-pg15-*.tar.gz; do
    [ -f "$archive" ] || continue
    name=$(basename "$archive"); name=${name%%-[0-9]*}
    built=$(tar -xzOf "$archive" --wildcards '*/BUILDINFO' 2>/dev/null \
            | sed -n 's/^Built against *: .* \([0-9][0-9.]*-[^ ]*\) .*/\1/p' | head -1 || true)
    have=$(pg_version)
    if [ -f "$extdir/$name.control" ] \
       && { [ -z "$built" ] || dpkg --compare-versions "$have" ge "$built"; }; then
        continue
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "pg-extensions: not root, $name not installed (its tests will be skipped)" >&2
        continue
    fi
    if [ -n "$built" ] && ! dpkg --compare-versions "$have" ge "$built"; then
        echo "pg-extensions: $name was built against postgresql-15 $built; upgrading from $have" >&2
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --only-upgrade postgresql-15 >/dev/null
    fi
    echo "pg-extensions: installing $(basename "$archive")" >&2
    bash "$installer" "$archive" > /dev/null
done
