#!/usr/bin/env bash
# Install everything, then lint, type-check and run the whole test suite:
# tests/unit (the fake), tests/testdriver (libvirt's test:///default driver)
# and tests/real (a real libvirtd + QEMU; the lab starts libvirtd when none
# runs).  Python runs in development mode (-X dev), which turns on asyncio's
# debug checks: a libvirt hook called off the loop thread would fail loudly.
# Extra arguments go to pytest (e.g. -m "not qemu": everything but tests/real,
# in FAST_WORKERS processes as in the whole run).
# PYTHON and VENV choose the interpreter and the virtualenv (see bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
bash scripts/lint.sh
# The fast tiers mostly wait (their windows and timers are short but real, a
# few hundred ms), so they run in FAST_WORKERS processes at once (pytest-xdist);
# the real tier shares one libvirtd and boots guests: one test at a time.
FAST_WORKERS="${FAST_WORKERS:-4}"
if [ $# -eq 0 ]; then
    fast=0
    "$VENV/bin/python" -X dev -m pytest -q -m "not qemu" -n "$FAST_WORKERS" || fast=$?
    "$VENV/bin/python" -X dev -m pytest -q -m qemu
    exit $fast
elif [ "$*" = '-m not qemu' ]; then
    "$VENV/bin/python" -X dev -m pytest -q -m "not qemu" -n "$FAST_WORKERS"
else
    "$VENV/bin/python" -X dev -m pytest -q "$@"
fi
