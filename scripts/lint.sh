#!/usr/bin/env bash
# Install everything (scripts/bootstrap.sh), then ruff (lint and format) and
# mypy --strict.  scripts/test.sh runs it before the tests; CI runs it once.
# PYTHON and VENV choose the interpreter and the virtualenv (see bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
bash scripts/bootstrap.sh
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"
