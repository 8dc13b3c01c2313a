#!/usr/bin/env bash
# Install everything, then lint, type-check and run the whole test suite:
# tests/unit (the fake), tests/testdriver (libvirt's test:///default driver)
# and tests/real (a real libvirtd + QEMU; the lab starts libvirtd when none
# runs).  Python runs in development mode (-X dev), which turns on asyncio's
# debug checks: a libvirt hook called off the loop thread would fail loudly.
# Extra arguments go to pytest (e.g. -m "not qemu": everything but tests/real).
# PYTHON and VENV choose the interpreter and the virtualenv (see bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
bash scripts/lint.sh
"$VENV/bin/python" -X dev -m pytest -q "$@"
