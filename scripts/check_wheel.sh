#!/usr/bin/env bash
# Build aiodetach's sdist and wheel, check their metadata, then install the
# wheel alone into a fresh virtualenv and test *that*: import it, run
# `aiodetach --version`, and run the fast tiers (tests/unit, tests/testdriver)
# against the installed package, not the source tree.  Fails if any lab
# module (aiodetach_lab, or the old aiodetach._lab/_guest/_demo) is inside.
#   VENV: the development virtualenv with the release group (build, twine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
WHEEL_VENV="${WHEEL_VENV:-.venv-wheel}"
PY="$VENV/bin/python"

rm -rf dist
"$PY" -m build --sdist --wheel --outdir dist . >/dev/null
"$VENV/bin/twine" check --strict dist/*

"$PY" - dist/*.whl <<'PY'
import sys, zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
lab = [n for n in names if "aiodetach_lab" in n or n.rsplit("/", 1)[-1] in {"_lab.py", "_guest.py", "_demo.py"}]
stray = [n for n in names if not n.startswith(("aiodetach/", "aiodetach-"))]
missing = {"aiodetach/__init__.py", "aiodetach/py.typed", "aiodetach/testing.py"} - set(names)
if lab or stray or missing:
    sys.exit(f"wheel content is wrong: lab modules {lab}, stray files {stray}, missing {sorted(missing)}")
print(f"wheel: {len(names)} files, library only")
PY

rm -rf "$WHEEL_VENV"
"$PY" -c 'import sys; print(sys.executable)' >/dev/null
"$(readlink -f "$VENV/bin/python")" -m venv "$WHEEL_VENV"
"$WHEEL_VENV/bin/python" -m pip install -q --disable-pip-version-check -U "pip>=25.1"
"$WHEEL_VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "$(ls dist/*.whl)[prometheus,otel]" --group test
"$WHEEL_VENV/bin/aiodetach" --version
"$WHEEL_VENV/bin/python" - <<'PY'
import importlib.util, pathlib
import aiodetach, aiodetach.testing

where = pathlib.Path(aiodetach.__file__).resolve()
assert "site-packages" in where.parts, where
assert importlib.util.find_spec("aiodetach_lab") is None, "the lab is installed"
for name in ("_lab", "_guest", "_demo"):
    assert importlib.util.find_spec(f"aiodetach.{name}") is None, name
print(f"aiodetach {aiodetach.__version__} from {where.parent}")
PY
# As in scripts/test.sh: six workers, worksteal, cached assertion rewrites.
unset PYTHONDONTWRITEBYTECODE
AIODETACH_TEST_INSTALLED=1 "$WHEEL_VENV/bin/python" -X dev -m pytest -q -p no:cacheprovider \
    -n "${FAST_WORKERS:-6}" --dist worksteal tests/unit tests/testdriver
