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
# few hundred ms), so they run in FAST_WORKERS processes at once (pytest-xdist),
# an idle worker taking tests queued for a busy one (worksteal: a few tests take
# several seconds); the real tier shares one libvirtd and boots guests: one
# test at a time.  Each worker collects every test module: pytest keeps their
# assertion-rewritten code in __pycache__ (ignored by git), which a host's
# PYTHONDONTWRITEBYTECODE would make every worker redo (1.5 s of CPU each).
FAST_WORKERS="${FAST_WORKERS:-6}"
unset PYTHONDONTWRITEBYTECODE
if [ $# -eq 0 ]; then
    fast=0
    "$VENV/bin/python" -X dev -m pytest -q -m "not qemu" -n "$FAST_WORKERS" --dist worksteal || fast=$?
    "$VENV/bin/python" -X dev -m pytest -q -m qemu
    exit $fast
elif [ "$*" = '-m not qemu' ]; then
    "$VENV/bin/python" -X dev -m pytest -q -m "not qemu" -n "$FAST_WORKERS" --dist worksteal
else
    "$VENV/bin/python" -X dev -m pytest -q "$@"
fi
