"""A **fake** hypervisor for testing code that uses aiodetach.

`FakeHypervisor` is not libvirt and not QEMU.  It implements the small
interface [`DetachService`][aiodetach.DetachService] talks to, with libvirt's error
codes and messages, and lets a test decide what the "guest" does with each
unplug: release the device at once (before the request returns, as a booted
Linux guest often does), later, never (a guest with no OS), reject it
(``DEVICE_REMOVAL_FAILED``, which real guests rarely produce), lose the first
requests (a guest still in firmware), or wait for the test to say.  It can
also drop events, crash and restart "libvirtd", and stop domains, and hold a
domain's job the way a live migration does (`FakeHypervisor.hold_job`,
`FakeHypervisor.release_job`, `FakeHypervisor.finish_migration`).

Use it where a real hypervisor cannot produce the case on demand; test the
happy paths against a real libvirtd too.  Everything it does is recorded in
`FakeHypervisor.requests` so tests can assert how many requests were
sent, and `FakeHypervisor.max_in_flight` tells whether an unplug was
ever re-sent while one was pending.

Example

```python
fake = FakeHypervisor()
vm = fake.add_domain("vm-1")
vm.add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.later(0.05))
async with DetachService(backend=fake) as svc:
    result = await svc.detach("vm-1", alias="ua-disk1")
assert len(fake.requests) == 1
```
"""

from __future__ import annotations

import threading
import time
import uuid as _uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ._rules import uuid_in
from .backend import BackendError, DomainInfo, DomainState, ErrorCode, ErrorDomain, EventSink

__all__ = [
    "FakeDevice",
    "FakeDomain",
    "FakeHypervisor",
    "GuestUnplug",
    "Request",
    "Unplug",
]

Behaviour = Literal["remove", "later", "ignore", "fail", "manual"]
OnReset = Literal["keep", "void", "complete"]


@dataclass(frozen=True)
class GuestUnplug:
    """What the fake guest does when asked to release a device."""

    behaviour: Behaviour = "remove"
    delay: float = 0.0
    lose_first: int = 0
    """Requests lost before the guest listens (a guest still in firmware)."""
    refuse_while_pending: bool = False
    """Re-sends during a pending unplug fail like QEMU's native PCIe hotplug
    ("already in the process of unplug")."""
    emit_event: bool = True
    """False: the device is removed but DEVICE_REMOVED is lost."""
    busy_first: int = 0
    """The first requests are refused with QEMU's "guest is busy (power
    indicator blinking)", as right after a native-PCIe hot-plug while the
    slot settles: they are not accepted and leave nothing pending."""
    on_reset: OnReset = "keep"
    """What a guest reset (`FakeHypervisor.reset_domain`) does to a
    pending unplug: ``"void"`` as QEMU's native PCIe hotplug (the guest never
    releases the device for it; see `reset_hold`), ``"complete"`` as
    ACPI hotplug (the reset removes the device, ``DEVICE_REMOVED`` follows),
    ``"keep"`` nothing (the pending unplug goes on)."""
    reset_hold: float = 0.0
    """With ``on_reset="void"``: a new request is refused with "already in
    the process of unplug" until this long after the voided one was taken
    (QEMU: 5 s)."""

    @classmethod
    def native_pcie(cls, delay: float, *, hold: float = 5.0) -> GuestUnplug:
        """A fake slot behaving like QEMU's native PCIe hotplug: released
        ``delay`` s after the request, re-sends refused while it is pending,
        and a guest reset voids it (requests refused for ``hold`` s after the
        voided one was taken)."""
        return cls("later", delay, refuse_while_pending=True, on_reset="void", reset_hold=hold)

    @classmethod
    def acpi(cls, delay: float) -> GuestUnplug:
        """A fake slot behaving like ACPI hotplug: released ``delay`` s after
        the request, and a guest reset completes a pending unplug."""
        return cls("later", delay, on_reset="complete")

    @classmethod
    def now(cls) -> GuestUnplug:
        """Released before the request returns (event during the call)."""
        return cls("remove")

    @classmethod
    def later(cls, delay: float, **kw: object) -> GuestUnplug:
        """Released ``delay`` seconds after the request, from another thread."""
        return cls("later", delay, **kw)  # type: ignore[arg-type]

    @classmethod
    def never(cls) -> GuestUnplug:
        """A guest that ignores unplug requests (no OS, or a stuck driver)."""
        return cls("ignore")

    @classmethod
    def reject(cls, delay: float = 0.0) -> GuestUnplug:
        """The guest refuses: DEVICE_REMOVAL_FAILED after ``delay``."""
        return cls("fail", delay)

    @classmethod
    def manual(cls) -> GuestUnplug:
        """Nothing happens until the test calls `FakeHypervisor.complete()`."""
        return cls("manual")


Unplug = GuestUnplug
"""The former name of `GuestUnplug`, kept as an alias (the same class):
``Unplug.later(0.05)`` goes on working.  New code says ``GuestUnplug``, which
does not read like the library's own live unplug."""


@dataclass
class FakeDevice:
    tag: str
    alias: str
    attrs: dict[str, str]
    unplug: GuestUnplug
    live: bool = True
    config: bool = True
    pending_since: float | None = None
    requests: int = 0
    address: dict[str, str] | None = None
    """Its guest ``<address>`` (attributes as libvirt writes them:
    ``type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'``)."""
    live_address: dict[str, str] | None = None
    """The live definition's address when it differs from `address`
    (a device attached to both definitions at once is placed in each)."""
    xml: str | None = None
    """The device's own XML, for a device added with `FakeDomain.add_device()`."""
    """The device's own XML, for a device added with `FakeDomain.add_device`."""
    held_until: float | None = None
    """A reset voided its unplug: requests refused until then (monotonic)."""
    epoch: int = 0
    """Bumped when a reset voids its unplug: a release scheduled before is void."""

    def element(self, *, live: bool) -> ET.Element:
        # The test's own XML, or built from the attributes.
        elem = ET.fromstring(self.xml) if self.xml is not None else self._built()  # noqa: S314
        address = self.live_address if live and self.live_address is not None else self.address
        if address is not None:
            ET.SubElement(elem, "address", address)
        if live or self.alias.startswith("ua-"):
            ET.SubElement(elem, "alias", name=self.alias)
        return elem

    def _built(self) -> ET.Element:
        elem = ET.Element(self.tag)
        if self.tag == "disk":
            elem.set("type", "file")
            elem.set("device", "disk")
            ET.SubElement(
                elem, "target", dev=self.attrs["target"], bus=self.attrs.get("bus", "virtio")
            )
        elif self.tag == "interface":
            elem.set("type", "network")
            ET.SubElement(elem, "mac", address=self.attrs["mac"])
            ET.SubElement(elem, "source", network="default")
        elif self.tag == "hostdev":
            elem.set("mode", "subsystem")
            elem.set("type", "pci")
            source = ET.SubElement(elem, "source")
            ET.SubElement(
                source,
                "address",
                domain="0x0000",
                bus=self.attrs["bus"],
                slot="0x00",
                function="0x0",
            )
        return elem

    def matches(self, elem: ET.Element) -> bool:
        """Whether a config detach of ``elem`` finds this device (as libvirt:
        an interface by its MAC and, when given, its guest address)."""
        if elem.tag != self.tag:
            return False
        given = elem.find("address")
        if given is not None and _numbers(given.attrib) != _numbers(self.address or {}):
            return False
        if self.xml is not None:
            return _shape(elem) == _shape(ET.fromstring(self.xml))  # noqa: S314 - the test's
        if self.tag == "disk":
            target = elem.find("target")
            return target is not None and target.get("dev") == self.attrs["target"]
        if self.tag == "interface":
            mac = elem.find("mac")
            return mac is not None and (mac.get("address") or "").lower() == self.attrs["mac"]
        if self.tag == "hostdev":
            address = elem.find("source/address")
            return address is not None and address.get("bus") == self.attrs["bus"]
        alias = elem.find("alias")
        return alias is not None and alias.get("name") == self.alias


def _numbers(attrs: dict[str, str]) -> dict[str, str]:
    """Address attributes compared as libvirt compares them: ``0x05`` is ``5``."""
    out = {}
    for key, value in attrs.items():
        try:
            out[key] = str(int(value, 0))
        except ValueError:
            out[key] = value
    return out


def _shape(elem: ET.Element) -> object:
    """An element compared whole, its ``<alias>`` and ``<address>`` aside."""
    return (
        elem.tag,
        sorted(elem.attrib.items()),
        (elem.text or "").strip(),
        [_shape(child) for child in elem if child.tag not in ("alias", "address")],
    )


@dataclass
class FakeDomain:
    name: str
    uuid: str
    state: DomainState = DomainState.RUNNING
    persistent: bool = True
    devices: list[FakeDevice] = field(default_factory=list)
    _counter: int = 0
    run: int = 1
    """This run of the domain (its ``DomainInfo.run_id``); bump it to model a
    domain re-started since."""
    stop_reason: str | None = None
    """Why it is shut off (its ``DomainInfo.stop_reason``, libvirt's shutoff
    reason), set by `FakeHypervisor.stop_domain` and
    `FakeHypervisor.finish_migration`."""
    machine: str = ""
    """``<os><type machine=…>`` (e.g. ``"pc-q35-7.2"``), written when set."""
    acpi: bool = True
    """``<features><acpi/>``, written with `machine`."""
    qemu_args: tuple[str, ...] = ()
    """Arguments passed through to QEMU (``<qemu:commandline>``), e.g.
    ``("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off")`` for
    native PCIe hotplug on q35."""

    def _add(
        self,
        tag: str,
        alias: str | None,
        attrs: dict[str, str],
        unplug: GuestUnplug | None,
        live: bool,
        config: bool,
        address: dict[str, str] | None = None,
        live_address: dict[str, str] | None = None,
        xml: str | None = None,
    ) -> FakeDevice:
        self._counter += 1
        dev = FakeDevice(
            tag,
            alias or f"{tag}{self._counter}",
            attrs,
            unplug or GuestUnplug.now(),
            live=live and self.state.is_active,
            config=config and self.persistent,
            address=address,
            live_address=live_address,
            xml=xml,
        )
        self.devices.append(dev)
        return dev

    def add_disk(
        self,
        target: str,
        *,
        alias: str | None = None,
        unplug: GuestUnplug | None = None,
        live: bool = True,
        config: bool = True,
        address: dict[str, str] | None = None,
        live_address: dict[str, str] | None = None,
    ) -> FakeDevice:
        return self._add(
            "disk", alias, {"target": target}, unplug, live, config, address, live_address
        )

    def add_interface(
        self,
        mac: str,
        *,
        alias: str | None = None,
        unplug: GuestUnplug | None = None,
        live: bool = True,
        config: bool = True,
        address: dict[str, str] | None = None,
        live_address: dict[str, str] | None = None,
    ) -> FakeDevice:
        return self._add(
            "interface", alias, {"mac": mac.lower()}, unplug, live, config, address, live_address
        )

    def add_hostdev(
        self,
        bus: str,
        *,
        alias: str | None = None,
        unplug: GuestUnplug | None = None,
        live: bool = True,
        config: bool = True,
        address: dict[str, str] | None = None,
        live_address: dict[str, str] | None = None,
    ) -> FakeDevice:
        return self._add(
            "hostdev", alias, {"bus": bus}, unplug, live, config, address, live_address
        )

    def add_device(
        self,
        xml: str,
        *,
        alias: str | None = None,
        unplug: Unplug | None = None,
        live: bool = True,
        config: bool = True,
        address: dict[str, str] | None = None,
        live_address: dict[str, str] | None = None,
    ) -> FakeDevice:
        """Any device, given as its XML without ``<alias>`` and ``<address>``
        (those are added per definition, as libvirt writes them).  A config
        detach finds it by the whole element (and the guest address, when
        given)."""
        tag = ET.fromstring(xml).tag  # noqa: S314 - the test's own XML
        return self._add(tag, alias, {}, unplug, live, config, address, live_address, xml)

    def live_device(self, alias: str) -> FakeDevice | None:
        return next((d for d in self.devices if d.live and d.alias == alias), None)

    def xml(self, *, inactive: bool) -> str:
        root = ET.Element("domain", type="qemu")
        ET.SubElement(root, "name").text = self.name
        ET.SubElement(root, "uuid").text = self.uuid
        if self.machine:
            os_elem = ET.SubElement(root, "os")
            ET.SubElement(os_elem, "type", machine=self.machine).text = "hvm"
            if self.acpi:
                ET.SubElement(ET.SubElement(root, "features"), "acpi")
        devices = ET.SubElement(root, "devices")
        live = self.state.is_active and not inactive
        for dev in self.devices:
            if (live and dev.live) or (not live and dev.config):
                devices.append(dev.element(live=live))
        if self.qemu_args:
            qemu = "{http://libvirt.org/schemas/domain/qemu/1.0}"
            commandline = ET.SubElement(root, qemu + "commandline")
            for arg in self.qemu_args:
                ET.SubElement(commandline, qemu + "arg", value=arg)
        return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class Request:
    """One live detach request that reached the fake."""

    domain: str
    alias: str
    at: float
    while_pending: bool


@dataclass
class _Job:
    """A fake job holding a domain (see `FakeHypervisor.hold_job`)."""

    holder: str
    wait: float
    ended: bool = False
    blocked: int = 0


def _err(code: int, message: str, origin: int = ErrorDomain.QEMU) -> BackendError:
    return BackendError(code, message, origin=origin)


class FakeHypervisor:
    """An in-memory, thread-safe stand-in for libvirtd + QEMU (a **fake**)."""

    uses_libvirt_events = False
    """It delivers its notifications itself, from its own threads."""

    def __init__(self, uri: str = "fake:///system") -> None:
        self._uri = uri
        self._lock = threading.RLock()
        self._sink: EventSink | None = None
        self._read_only = False
        self._timers: set[threading.Timer] = set()
        self.domains: dict[str, FakeDomain] = {}
        self.requests: list[Request] = []
        self.config_requests: list[tuple[str, str]] = []
        self.calls: list[str] = []
        self.daemon_up = True
        self.connected = False
        self.opens = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.call_latency = 0.0
        """Seconds each detach request blocks in its thread (libvirt may block 5 s)."""
        self.before_call: Callable[[str], object] | None = None
        """Called in the worker thread at the start of every call (for interleaving tests)."""
        self.fail_next: dict[str, BackendError] = {}
        """Method name → error raised once by the next call of it."""
        self.busy_refusals = 0
        """Requests refused as "guest is busy" (see `GuestUnplug.busy_first`)."""
        self._jobs: dict[str, _Job] = {}
        self._job_changed = threading.Condition(threading.Lock())
        self.job_timeouts: list[str] = []
        """Calls (``detach_live``, ``detach_config``) refused because a fake job
        held their domain past its wait (code 68), in order."""
        """Requests refused as "guest is busy" (see `GuestUnplug.busy_first`)."""
        self.voided = 0
        """Pending unplugs a reset voided (see `reset_domain`)."""
        self.held_refusals = 0
        """Requests refused because a voided unplug still holds the slot."""

    # -- test controls -----------------------------------------------------------------
    @property
    def uri(self) -> str:
        return self._uri

    @property
    def sink(self) -> EventSink | None:
        """What the service registered for notifications, while connected: what
        libvirt would call.  Benchmarks and interleaving tests deliver events
        through it directly."""
        return self._sink if self.connected else None

    def add_domain(
        self, name: str, *, running: bool = True, persistent: bool = True, uuid: str | None = None
    ) -> FakeDomain:
        with self._lock:
            dom = FakeDomain(
                name,
                uuid or str(_uuid.uuid4()),
                DomainState.RUNNING if running else DomainState.SHUTOFF,
                persistent,
            )
            self.domains[dom.uuid] = dom
            return dom

    def domain(self, ref: str) -> FakeDomain:
        with self._lock:
            # UUIDs as libvirt's lookupByUUIDString takes them (any case, with
            # or without dashes), else names, as the real backend looks up.
            uuid = uuid_in(ref)
            dom = (
                self.domains.get(ref)
                or (self.domains.get(uuid) if uuid is not None else None)
                or next((d for d in self.domains.values() if d.name == ref), None)
            )
            if dom is None:
                raise KeyError(ref)
            return dom

    def complete(self, domain: str, alias: str, *, emit: bool = True) -> None:
        """The guest released the device: remove it and emit DEVICE_REMOVED."""
        with self._lock:
            dom = self.domain(domain)
            dev = dom.live_device(alias)
            if dev is None:
                return
            dev.live = False
            dev.pending_since = None
            sink = self._sink if self.connected else None
        if sink is not None and emit:
            sink.device_removed(dom.uuid, dom.name, alias)

    def reject(self, domain: str, alias: str) -> None:
        """The guest refused the unplug: emit DEVICE_REMOVAL_FAILED."""
        with self._lock:
            dom = self.domain(domain)
            dev = dom.live_device(alias)
            if dev is not None:
                dev.pending_since = None
            sink = self._sink if self.connected else None
        if sink is not None:
            sink.device_removal_failed(dom.uuid, dom.name, alias)

    def emit_removed(self, domain: str, alias: str) -> None:
        """Deliver a DEVICE_REMOVED without changing anything (late/duplicate events)."""
        dom = self.domain(domain)
        if self._sink is not None and self.connected:
            self._sink.device_removed(dom.uuid, dom.name, alias)

    def stop_domain(self, domain: str, reason: str = "destroyed") -> None:
        """Destroy/shut down: live devices vanish, lifecycle STOPPED is emitted.

        A job held by `hold_job` ends with the domain (libvirt's destroy
        kills QEMU, and the migration holding the job fails with it): the
        calls it blocked go on, as libvirt's do, against a shut-off domain."""
        with self._lock:
            dom = self.domain(domain)
            dom.state = DomainState.SHUTOFF
            dom.stop_reason = reason
            for dev in dom.devices:
                dev.live = False
                dev.pending_since = None
            if not dom.persistent:
                del self.domains[dom.uuid]
            sink = self._sink if self.connected else None
        if sink is not None:
            sink.domain_stopped(dom.uuid, dom.name, reason)
        self._end_job(dom.uuid)

    def hold_job(
        self,
        domain: str,
        *,
        wait: float = 30.0,
        holder: str = "remoteDispatchDomainMigratePerform3Params",
    ) -> None:
        """A fake job (a live migration, another client's long call) takes the
        domain's job: from now on every detach call (live or config) blocks,
        as libvirt's do, until `release_job` or `finish_migration`,
        or until ``wait`` seconds (libvirt's job wait, 30 s on QEMU) have passed;
        then it fails with code 68 (``VIR_ERR_OPERATION_TIMEOUT``) "cannot
        acquire state change lock (held by monitor=<holder>)" having done
        nothing.  Recorded in `job_timeouts`."""
        with self._job_changed:
            self._jobs[self.domain(domain).uuid] = _Job(holder, wait)

    def release_job(self, domain: str) -> None:
        """The job ends with the domain still here (a cancelled migration,
        ``abortJob``): the blocked calls go on as if nothing had held them."""
        self._end_job(self.domain(domain).uuid)

    def _end_job(self, uuid: str) -> None:
        with self._job_changed:
            job = self._jobs.pop(uuid, None)
            if job is not None:
                job.ended = True
                self._job_changed.notify_all()

    def finish_migration(
        self,
        domain: str,
        *,
        event: Literal["before", "after", "lost"] = "before",
        event_delay: float = 0.05,
    ) -> None:
        """The job held by `hold_job` ends as a completed migration: the
        domain leaves this host (shut off with reason ``migrated``, a
        transient one undefined), and the calls it blocked go on and fail as
        libvirt's do, "domain is not running" (code 55; a transient domain's:
        "no domain", code 42).  libvirt fails them at the moment it emits the
        STOPPED/MIGRATED lifecycle event, and either may reach a client
        first: ``event="before"`` emits it before the blocked calls are let
        go, ``"after"`` ``event_delay`` seconds after they failed, ``"lost"``
        never.  (The config definition of a persistent domain stays, inactive:
        a blocked config detach then edits it, as libvirt's does.)"""
        with self._lock:
            dom = self.domain(domain)
            dom.state = DomainState.SHUTOFF
            dom.stop_reason = "migrated"
            for dev in dom.devices:
                dev.live = False
                dev.pending_since = None
            if not dom.persistent:
                del self.domains[dom.uuid]
            sink = self._sink if self.connected else None
        if sink is not None and event == "before":
            sink.domain_stopped(dom.uuid, dom.name, "migrated")
        with self._job_changed:
            job = self._jobs.pop(dom.uuid, None)
            if job is not None:
                job.ended = True
                self._job_changed.notify_all()
                while job.blocked:  # every blocked call has failed
                    self._job_changed.wait()
        if sink is not None and event == "after":
            uuid, name = dom.uuid, dom.name
            self._later(
                event_delay, lambda _n, _a: sink.domain_stopped(uuid, name, "migrated"), "", ""
            )

    def _wait_for_job(self, uuid: str) -> None:
        """Block a detach call while a fake job holds its domain (see `hold_job`)."""
        with self._job_changed:
            job = self._jobs.get(uuid)
            if job is None:
                return
            job.blocked += 1
            try:
                deadline = time.monotonic() + job.wait
                while not job.ended:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _err(
                            ErrorCode.OPERATION_TIMEOUT,
                            "Timed out during operation: cannot acquire state change lock "
                            f"(held by monitor={job.holder})",
                        )
                    self._job_changed.wait(left)
            finally:
                job.blocked -= 1
                self._job_changed.notify_all()

    def pause_domain(self, domain: str) -> None:
        """Suspend the vCPUs: the guest answers nothing until resumed (the
        fake's timers still run, so pair this with `GuestUnplug.manual()`)."""
        with self._lock:
            self.domain(domain).state = DomainState.PAUSED

    def resume_domain(self, domain: str, *, emit: bool = True) -> None:
        """Run the vCPUs again; ``emit=False`` loses the lifecycle event."""
        with self._lock:
            dom = self.domain(domain)
            dom.state = DomainState.RUNNING
            sink = self._sink if self.connected and emit else None
        if sink is not None:
            sink.domain_resumed(dom.uuid, dom.name)

    def reset_domain(self, domain: str, *, emit: bool = True) -> None:
        """Reset the guest (``virDomainReset``, or a guest that reboots
        itself): libvirt's REBOOT is emitted (``emit=False`` loses it), then
        each pending unplug goes as its `GuestUnplug.on_reset` says:
        voided (native PCIe: no release ever comes for it), or completed
        (ACPI: the device is removed and DEVICE_REMOVED follows the REBOOT)."""
        with self._lock:
            dom = self.domain(domain)
            completed: list[str] = []
            for dev in dom.devices:
                since = dev.pending_since
                if not dev.live or since is None:
                    continue
                if dev.unplug.on_reset == "void":
                    dev.pending_since = None
                    dev.epoch += 1
                    dev.held_until = since + dev.unplug.reset_hold
                    self.voided += 1
                elif dev.unplug.on_reset == "complete":
                    completed.append(dev.alias)
            sink = self._sink if self.connected else None
        if sink is not None and emit:
            sink.domain_rebooted(dom.uuid, dom.name)
        for alias in completed:
            self.complete(dom.name, alias)

    def crash(self) -> None:
        """libvirtd dies: the connection closes, calls fail until `restart()`."""
        with self._lock:
            self.daemon_up = False
            was = self.connected
            self.connected = False
            sink = self._sink
        if was and sink is not None:
            sink.connection_closed("eof")

    def restart(self) -> None:
        with self._lock:
            self.daemon_up = True

    def cancel_timers(self) -> None:
        with self._lock:
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()

    # -- Backend -------------------------------------------------------------------------
    def _enter(self, name: str) -> None:
        hook = self.before_call
        if hook is not None:
            hook(name)
        with self._lock:
            self.calls.append(name)
            injected = self.fail_next.pop(name, None)
            if injected is not None:
                raise injected
            if name != "open" and not self.connected:
                raise _err(
                    ErrorCode.INTERNAL_ERROR,
                    "internal error: client socket is closed",
                    ErrorDomain.RPC,
                )

    def open(self, sink: EventSink, *, read_only: bool) -> None:
        self._enter("open")
        with self._lock:
            if not self.daemon_up:
                raise _err(
                    ErrorCode.SYSTEM_ERROR,
                    "Failed to connect socket to '/run/libvirt/libvirt-sock': Connection refused",
                    0,
                )
            self._sink, self._read_only, self.connected = sink, read_only, True
            self.opens += 1

    def close(self) -> None:
        hook = self.before_call
        if hook is not None:
            hook("close")
        with self._lock:
            self.calls.append("close")
            self.connected = False
            self._sink = None
        self.cancel_timers()

    def _find(self, ref: str) -> FakeDomain:
        try:
            return self.domain(ref)
        except KeyError:
            raise _err(
                ErrorCode.NO_DOMAIN,
                f"Domain not found: no domain with matching name or uuid '{ref}'",
            ) from None

    def lookup(self, ref: str) -> DomainInfo:
        self._enter("lookup")
        with self._lock:
            dom = self._find(ref)
            active = dom.state.is_active
            run_id = str(dom.run) if active else None
            stop_reason = None if active else dom.stop_reason
            return DomainInfo(dom.uuid, dom.name, dom.state, dom.persistent, run_id, stop_reason)

    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        self._enter("domain_xml")
        with self._lock:
            return self._find(uuid).xml(inactive=inactive)

    def detach_config(self, uuid: str, device_xml: str) -> None:
        self._enter("detach_config")
        self._job_wait("detach_config", uuid)
        with self._lock:
            if self._read_only:
                raise _err(
                    ErrorCode.OPERATION_DENIED,
                    "operation forbidden: read only access prevents virDomainDetachDeviceFlags",
                )
            dom = self._find(uuid)
            if not dom.persistent:
                raise _err(
                    ErrorCode.OPERATION_INVALID,
                    "Requested operation is not valid: cannot change persistent config of "
                    "a transient domain",
                )
            try:
                elem = ET.fromstring(device_xml)  # noqa: S314 - the service's own output
            except ET.ParseError as exc:
                raise _err(ErrorCode.XML_DETAIL, f"XML error: {exc}") from None
            self.config_requests.append((uuid, device_xml))
            found = [dev for dev in dom.devices if dev.config and dev.matches(elem)]
            if len(found) > 1 and elem.tag == "interface":
                raise _err(
                    ErrorCode.OPERATION_FAILED,
                    "operation failed: multiple devices matching MAC address "
                    f"{found[0].attrs['mac']} found",
                )
            if not found:
                raise _err(ErrorCode.DEVICE_MISSING, "device not found: no matching device")
            found[0].config = False

    def detach_live(self, uuid: str, alias: str) -> None:
        self._enter("detach_live")
        self._job_wait("detach_live", uuid)
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.call_latency:
                time.sleep(self.call_latency)
            self._detach_live(uuid, alias)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _detach_live(self, uuid: str, alias: str) -> None:
        with self._lock:
            if self._read_only:
                raise _err(
                    ErrorCode.OPERATION_DENIED,
                    "operation forbidden: read only access prevents virDomainDetachDeviceAlias",
                )
            dom = self._find(uuid)
            if not dom.state.is_active:
                raise _err(
                    ErrorCode.OPERATION_INVALID,
                    "Requested operation is not valid: domain is not running",
                )
            dev = dom.live_device(alias)
            if dev is None:
                raise _err(
                    ErrorCode.INTERNAL_ERROR, f"internal error: no device found with alias {alias}"
                )
            pending = dev.pending_since is not None
            now = time.monotonic()
            self.requests.append(Request(dom.uuid, alias, now, pending))
            dev.requests += 1
            plan = dev.unplug
            if dev.held_until is not None and now < dev.held_until:
                self.held_refusals += 1
                raise _err(
                    ErrorCode.INTERNAL_ERROR,
                    "internal error: unable to execute QEMU command 'device_del': "
                    f"Device {alias} is already in the process of unplug",
                )
            if pending and plan.refuse_while_pending:
                raise _err(
                    ErrorCode.INTERNAL_ERROR,
                    "internal error: unable to execute QEMU command 'device_del': "
                    f"Device {alias} is already in the process of unplug",
                )
            if dev.requests <= plan.busy_first and not pending:
                self.busy_refusals += 1
                raise _err(
                    ErrorCode.INTERNAL_ERROR,
                    "internal error: unable to execute QEMU command 'device_del': "
                    "Hot-unplug failed: guest is busy (power indicator blinking)",
                )
            if dev.requests - plan.busy_first <= plan.lose_first:
                return
            dev.pending_since = now
            name, epoch = dom.name, dev.epoch
        if plan.behaviour == "remove":
            self.complete(name, alias, emit=plan.emit_event)
        elif plan.behaviour in ("later", "fail"):

            def action(d: str, a: str) -> None:
                if dev.epoch != epoch:
                    return  # a reset voided the unplug this release belonged to
                if plan.behaviour == "fail":
                    self.reject(d, a)
                else:
                    self.complete(d, a, emit=plan.emit_event)

            self._later(plan.delay, action, name, alias)

    def _job_wait(self, name: str, uuid: str) -> None:
        try:
            self._wait_for_job(uuid)
        except BackendError:
            with self._lock:
                self.job_timeouts.append(name)
            raise

    def _later(self, delay: float, fn: Callable[[str, str], None], name: str, alias: str) -> None:
        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
            fn(name, alias)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()
