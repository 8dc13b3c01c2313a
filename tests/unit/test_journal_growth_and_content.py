"""What the journal holds: identifiers and timestamps only, and finished rows
pruned so that it does not grow with every detach."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiodetach import DetachService, DetachSettings
from aiodetach.testing import FakeHypervisor, Unplug

from ._journal_support import journal_rows


def _size(tmp: Path) -> int:
    return sum(p.stat().st_size for p in tmp.glob("j.db*"))


async def test_cycles_of_many_detaches_stay_bounded(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    settings = DetachSettings(attempts=2, timeout=1.0, journal_sync="normal", journal_retention=0.3)
    sizes = []
    for cycle in range(5):
        fake = FakeHypervisor()
        vm = fake.add_domain("vm")
        for i in range(200):
            vm.add_disk(f"vd{i}", alias=f"ua-{cycle}-{i}", unplug=Unplug.now())
        async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
            out = await svc.detach_many(
                [{"domain": "vm", "alias": f"ua-{cycle}-{i}"} for i in range(200)],
                concurrency=16,
            )
            assert all(o.ok for o in out)
        await asyncio.sleep(0.35)
        sizes.append(_size(tmp_path))
    async with DetachService(backend=FakeHypervisor(), settings=settings, journal=journal):
        pass
    assert journal_rows(journal) == []
    assert sizes[-1] <= sizes[1] * 1.5, sizes


async def test_rows_hold_identifiers_only(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    vm.add_interface("52:54:00:aa:bb:cc", alias="ua-n", unplug=Unplug.now())
    vm.add_hostdev("0x07", alias="ua-h", unplug=Unplug.now())
    async with DetachService(
        backend=fake, settings=DetachSettings(journal_sync="normal"), journal=journal
    ) as svc:
        await svc.detach(
            "vm",
            xml="<disk type='file' device='disk'><source file='/secret/path.img'/><target dev='vdb'/></disk>",
        )
        await svc.detach("vm", mac="52:54:00:AA:BB:CC")
        await svc.detach("vm", alias="ua-h")
    rows = journal_rows(journal)
    assert len(rows) == 3
    for r in rows:
        for v in r.values():
            assert "<" not in str(v), r
            assert "secret" not in str(v), r
    # raw bytes of every file too
    for p in tmp_path.glob("j.db*"):  # noqa: ASYNC240 - a test reading its own files
        data = p.read_bytes()
        for needle in (b"<domain", b"secret", b"<disk"):
            assert needle not in data, p
    print([r["device"] for r in rows])
