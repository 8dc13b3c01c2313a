"""Info-level logs of a real detach name what happened and never carry domain XML."""

from __future__ import annotations

from structlog.testing import capture_logs

from _probes import check_no_domain_xml
from aiodetach import DetachService, DetachSettings
from aiodetach_lab import domains as _lab


async def test_logs_of_a_real_detach(libvirtd: str) -> None:
    disks = [_lab.DiskSpec("sda", "scsi", "ua-s1")]
    with _lab.throwaway_domain(libvirtd, disks=disks) as dom, capture_logs() as entries:
        async with DetachService(libvirtd, settings=DetachSettings(timeout=5.0)) as svc:
            result = await svc.detach(dom.name, alias="ua-s1")
    assert result.live
    assert result.persistent
    assert "aiodetach.detached" in {str(e.get("event")) for e in entries}
    check_no_domain_xml(entries)
