"""``aiodetach detach-many`` with lines for two real libvirt daemons, each
holding a domain of the same name: every line reaches the host it names (or
the command's, ``-c``), and no other."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid as _uuid

import libvirt

from aiodetach_lab import domains as _lab
from aiodetach_lab.daemon import PrivateLibvirtd

from .._real import domains_removed

SCSI = [_lab.DiskSpec("sda", "scsi", alias="ua-s0"), _lab.DiskSpec("sdb", "scsi", alias="ua-s1")]


def live_aliases(uri: str, uuid: str) -> set[str]:
    conn = libvirt.open(uri)
    try:
        xml = conn.lookupByUUIDString(uuid).XMLDesc(0)
    finally:
        conn.close()
    return {alias for alias in ("ua-s0", "ua-s1") if f"name='{alias}'" in xml}


def test_each_line_goes_to_the_host_it_names(
    private_libvirtd: PrivateLibvirtd, second_private_libvirtd: PrivateLibvirtd
) -> None:
    name = f"aiodetach-cli-hosts-{_uuid.uuid4().hex[:6]}"
    first, second = private_libvirtd, second_private_libvirtd
    first_uuid = first.define(name, SCSI)
    second_uuid = second.define(name, SCSI)
    with domains_removed(first.uri, [first_uuid]), domains_removed(second.uri, [second_uuid]):
        batch = f"{name} alias=ua-s0\n{name} alias=ua-s1 uri={second.uri}\n"
        proc = subprocess.run(
            [sys.executable, "-m", "aiodetach", "-c", first.uri, "detach-many", "-", "--json"],
            input=batch,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
        *outcomes, summary = map(json.loads, proc.stdout.splitlines())
        assert summary["detached"] == 2
        by_index = {o["index"]: o for o in outcomes}
        assert by_index[0]["uri"] == first.uri
        assert by_index[0]["domain_uuid"] == first_uuid
        assert by_index[1]["uri"] == second.uri
        assert by_index[1]["domain_uuid"] == second_uuid
        # Each host lost the one disk its line named, and only that one.
        assert live_aliases(first.uri, first_uuid) == {"ua-s1"}
        assert live_aliases(second.uri, second_uuid) == {"ua-s0"}
