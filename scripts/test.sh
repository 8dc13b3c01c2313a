#!/usr/bin/env bash
# Install everything, then lint, type-check and run the whole test suite:
# fast unit tests and the real libvirtd + QEMU tests (the test setup starts
# libvirtd when none runs).  Python runs in development mode (-X dev), which
# turns on asyncio's debug checks: a libvirt hook called off the loop thread
# would fail loudly.  Extra arguments go to pytest (e.g. -m "not qemu").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -X dev -m pytest -q "$@"
