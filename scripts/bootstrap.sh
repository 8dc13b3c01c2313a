#!/usr/bin/env bash
# Install what aiodetach's demo, tests and benchmarks need on a Debian/Ubuntu
# machine: libvirt + QEMU + build tools (apt), and a virtualenv with the
# package (editable, with its prometheus and otel extras), the lab (lab/,
# editable: the development package with libvirtd, throwaway domains, the
# guest image builder and the demo) and the dev dependency group.
# libvirt-python is built from source against the system's libvirt by pip,
# for whichever interpreter the virtualenv uses.  Idempotent and quick when
# everything is already there.
#
#   PYTHON=/path/to/python3.13 VENV=.venv-3.13 bash scripts/bootstrap.sh
#   EXTRA_GROUPS="docs release" bash scripts/bootstrap.sh   # more dependency groups
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PKGS=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils libvirt-dev
      pkg-config gcc busybox-static procps python3-venv gnutls-bin
      zsh)  # zsh: the CLI completion test checks that its zsh script parses
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
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U "pip>=25.1"
# PEP 735 dependency groups need pip >= 25.1.
groups=(--group dev)
for g in ${EXTRA_GROUPS:-}; do groups+=(--group "$g"); done
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -e ".[prometheus,otel]" -e ./lab "${groups[@]}"
