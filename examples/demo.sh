#!/usr/bin/env bash
# The demo: installs libvirt + QEMU if needed, starts libvirtd if none runs,
# boots throwaway QEMU guests and detaches their devices while printing the
# events, timeouts and retries; the guests are removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${VENV:-.venv}/bin/aiodetach-lab" demo "$@"
