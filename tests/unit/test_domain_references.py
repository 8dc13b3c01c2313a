"""A domain is named the same way everywhere: ``detach()`` and ``events()``
take a name, a UUID in any spelling libvirt reads as one (any case, with or
without dashes), or a virDomain, and mean the same domain by it (on the fake;
``tests/testdriver/test_domain_lookup_spellings.py`` checks the spellings
against libvirt's own parser)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from _probes import child_env
from aiodetach import DetachService, DetachSettings
from aiodetach._rules import uuid_in
from aiodetach.testing import FakeHypervisor, Unplug

from ._cli_on_fake import VM_UUID

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


class _VirDomain:
    """What ``detach`` and ``events`` use of a libvirt.virDomain."""

    def UUIDString(self) -> str:
        return UUID


SPELLINGS: dict[str, object] = {
    "name": "vm",
    "uuid": UUID,
    "upper case": UUID.upper(),
    "no dashes": UUID.replace("-", ""),
    "upper case, no dashes": UUID.replace("-", "").upper(),
    "spaces around": f"  {UUID} ",
    "dashes elsewhere": "66-95-eb01f6a4830479aa97f2502e193f",
    "virDomain": _VirDomain(),
}


@pytest.mark.parametrize("spelling", SPELLINGS.values(), ids=SPELLINGS.keys())
async def test_events_and_detach_name_a_domain_alike(
    fake: FakeHypervisor, spelling: object
) -> None:
    vm = fake.add_domain("vm", uuid=UUID)
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    other = fake.add_domain("other")
    other.add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    seen: list[tuple[str, str | None]] = []
    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:

        async def watch() -> None:
            async for event in svc.events(spelling):
                seen.append((event.domain_name, event.alias))

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)  # subscribed
        assert (await svc.detach("other", alias="ua-d")).confirmed_by == "event"
        result = await svc.detach(spelling, alias="ua-d")
        assert (result.domain_name, result.confirmed_by) == ("vm", "event")
    # Every event was published before its detach returned; the close ends the stream.
    await watcher
    assert seen == [("vm", "ua-d")]


async def test_events_by_a_uuid_shaped_name_see_that_domain(fake: FakeHypervisor) -> None:
    """A name that reads as a UUID names the domain so called when no domain
    has that UUID (as a lookup falls back to the name)."""
    shaped = "0123456789abcdef0123456789abcdef"
    fake.add_domain(shaped).add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    seen: list[str] = []
    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:

        async def watch() -> None:
            async for event in svc.events(shaped):
                seen.append(event.domain_name)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        assert (await svc.detach(shaped, alias="ua-d")).domain_name == shaped
    await watcher
    assert seen == [shaped]


@pytest.mark.parametrize(
    ("ref", "uuid"),
    [
        (UUID, UUID),
        (UUID.upper(), UUID),
        (UUID.replace("-", ""), UUID),
        (f" \t{UUID}\n", UUID),
        ("66-95eb01-f6a4-8304-79aa-97f2502e193f", UUID),
        ("6695eb01 f6a4 8304 79aa 97f2502e193f", UUID),
        ("-6695eb01f6a4830479aa97f2502e193f", UUID),
        ("vm", None),
        ("", None),
        (f"{{{UUID}}}", None),
        (f"urn:uuid:{UUID}", None),
        (UUID[:-1], None),
        (UUID + "0", None),
        (UUID + "-", None),
        ("6-695eb01f6a4830479aa97f2502e193f", None),  # a dash inside a pair
        ("6695eb01-f6a4-8304-79aa-97f2502e193g", None),
    ],
)
def test_uuid_spellings_read_as_libvirt_reads_them(ref: str, uuid: str | None) -> None:
    assert uuid_in(ref) == uuid


async def test_the_clis_watch_names_a_domain_as_detach_does() -> None:
    """``aiodetach watch UUID`` with the UUID as a user may paste it (upper
    case, no dashes) shows that domain's events, and no other's (the fake
    reports removals on ``other`` and ``vm`` alternately)."""
    helper = Path(__file__).with_name("_cli_on_fake.py")
    spelled = VM_UUID.upper().replace("-", "")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(helper),
        "watch",
        spelled,
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(AIODETACH_FAKE_EVENTS="1"),
    )
    assert proc.stdout is not None
    try:
        shown = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert [(e["domain"], e["domain_uuid"], e["alias"]) for e in shown] == [
        ("vm", VM_UUID, "ua-x")
    ] * 3
