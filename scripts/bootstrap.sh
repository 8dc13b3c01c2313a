#!/usr/bin/env bash
# Install what aiodetach's demo, tests and benchmarks need on a Debian/Ubuntu
# machine: libvirt + QEMU + build tools (apt), and a virtualenv in .venv with
# the package (editable, with its prometheus and otel extras) and its dev
# dependency group (which also has what the tests of those extras need: the
# OpenTelemetry SDK's in-memory exporter).  Idempotent and quick
# when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PKGS=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils libvirt-dev
      pkg-config gcc busybox-static procps)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U "pip>=25.1"
# PEP 735 dependency groups need pip >= 25.1.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[prometheus,otel]" --group dev
