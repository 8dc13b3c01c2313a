"""Every ``python`` block of README.md and docs/*.md runs, against the fake,
so the examples cannot rot (the convention is in docs/coming-from.md, "The
examples here run").

Each block runs alone, with a fresh fake behind every libvirt URI it names:
the real backend's constructor is swapped for one that hands out fakes, so
the block's own ``DetachService("qemu:///system")``, blocking facade or fleet
reaches one unchanged.  A block with a top-level ``await`` runs on an event
loop with ``svc`` (an open service) and ``requests`` (a small batch) at
hand; one without runs on a thread with no event loop.  A block whose first
line is ``# not run: <why>`` is left out; that set is pinned below so that
it stays small and deliberate.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import aiodetach
import aiodetach._service
from aiodetach.testing import FakeHypervisor, GuestUnplug

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = "# not run:"
WAIT = 120.0  # bounds the wait for a block against a hang only

# The deliberately illustrative blocks: (file, first line).  Adding one is a decision.
ILLUSTRATIVE = {
    ("coming-from.md", "# not run: libvirt-python against a real libvirtd"),
    ("journal.md", "# not run: writes /var/lib/myagent (a path on the host)"),
    ("connecting.md", "# not run: the four ways side by side (uri, auth and conn are yours)"),
    ("connecting.md", "# not run: needs your credentials store and a libvirtd on qemu+tcp"),
}


def _blocks() -> Iterator[tuple[str, int, str]]:
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield path.name, line, match.group(1)


BLOCKS = list(_blocks())


def _world(uri: str) -> FakeHypervisor:
    """The fake every example's libvirt URI reaches (see the module docstring)."""
    fake = FakeHypervisor(uri)
    for name in ("vm-1", "vm-2", "vm-7"):
        vm = fake.add_domain(name)
        now = GuestUnplug.later(0.005)
        vm.add_disk("vdb", alias="ua-disk2", unplug=now)
        vm.add_disk("vdc", alias="ua-disk1", unplug=now)
        vm.add_disk("vdd", alias="ua-disk3", unplug=now)
        vm.add_interface("52:54:00:12:34:56", alias="ua-net0", unplug=now)
        vm.add_interface("52:54:00:12:34:57", alias="ua-net1", unplug=now)
    return fake


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, FakeHypervisor]]:
    made: dict[str, FakeHypervisor] = {}

    def backend(uri: str, **_: object) -> FakeHypervisor:
        if uri not in made:
            made[uri] = _world(uri)
        return made[uri]

    monkeypatch.setattr(aiodetach._service, "LibvirtBackend", backend)
    yield made
    for fake in made.values():
        fake.cancel_timers()


def _namespace() -> dict[str, Any]:
    ns: dict[str, Any] = {"__name__": "__docs_example__"}
    ns.update({name: getattr(aiodetach, name) for name in aiodetach.__all__})
    return ns


def _run(code: Any, ns: dict[str, Any]) -> None:
    if not code.co_flags & inspect.CO_COROUTINE:
        exec(code, ns)  # noqa: S102 - the repository's own documentation
        return

    async def on_a_loop() -> None:
        async with aiodetach.DetachService("qemu:///system") as svc:
            ns["svc"] = svc
            ns["requests"] = [{"domain": "vm-2", "alias": "ua-disk3"}]
            coro = eval(code, ns)  # noqa: S307 - the repository's own documentation
            await coro

    asyncio.run(on_a_loop())


@pytest.mark.parametrize(
    ("page", "line", "source"),
    [b for b in BLOCKS if not b[2].startswith(NOT_RUN)],
    ids=[f"{p}:{n}" for p, n, s in BLOCKS if not s.startswith(NOT_RUN)],
)
def test_docs_example_runs(
    page: str, line: int, source: str, fakes: dict[str, FakeHypervisor]
) -> None:
    code = compile(
        source, f"{page}:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    done: Future[None] = Future()

    def run() -> None:  # a thread with no event loop, whatever the test runner has
        try:
            _run(code, _namespace())
        except BaseException as exc:  # handed to the test
            done.set_exception(exc)
        else:
            done.set_result(None)

    threading.Thread(target=run, name=f"docs-{page}:{line}").start()
    done.result(WAIT)
    assert fakes, "the example reached no hypervisor"


def test_the_illustrative_blocks_are_the_few_pinned() -> None:
    skipped = {(p, s.splitlines()[0]) for p, _, s in BLOCKS if s.startswith(NOT_RUN)}
    assert skipped == ILLUSTRATIVE
    assert len(BLOCKS) - len(skipped) >= 8  # README, index, coming-from, … run
