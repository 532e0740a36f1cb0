#!/usr/bin/env bash
# Installs what the demo and the test suite need on a fresh Debian machine:
# Debian packages (with apt-get, when run as root) and a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(postgresql postgresql-contrib snmpd snmp openipmi freeipmi-tools ipmitool
              prometheus-node-exporter)
APT_PACKAGES+=(chromium chromium-driver curl)   # the web view's browser test; the guides' curl commands
APT_PACKAGES+=(slurm-wlm munge oar-server oar-user)   # the job tests run real Slurm and OAR tools
APT_PACKAGES+=(debhelper dh-virtualenv python3-venv)   # scripts/build-deb (the Debian package and its test)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ]; then
        echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "bootstrap: missing Debian packages (install them as root): ${missing[*]}" >&2
    fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.kwollect-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if ! .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' > .venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
