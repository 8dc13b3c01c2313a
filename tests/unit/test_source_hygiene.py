"""Source hygiene: no shell-outs, no XML from string formatting, no domain XML in info logs;
small modules, no public module importing the package face, libvirt's error codes read in
one place."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import aiodetach
from _probes import check_no_domain_xml, info_and_up
from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DetachError, DetachTimeout, DeviceNotFound, InvalidRequest
from aiodetach.testing import FakeHypervisor, Unplug

SRC = Path(aiodetach.__file__).parent
SOURCES = sorted(SRC.glob("*.py"))
RUNNERS = {"run", "Popen", "call", "check_call", "check_output"}


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else "?"


def test_sources_found() -> None:
    assert len(SOURCES) >= 10


LIBRARY = sorted(SRC.rglob("*.py"))
MAX_LINES = 450
# Larger, each reading as one thing: the table of device rules, the SQLite
# journal, the public fake, and the live unplug's state machine (its rules read
# top to bottom; its vocabulary is _machine_io.py).
LARGER = {"_xml.py", "_journal.py", "testing.py", "_machine.py"}
PUBLIC = ["errors", "backend", "testing", "instrumentation"]


def _module(path: Path) -> str:
    parts = ["aiodetach", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The aiodetach modules ``path`` imports, lazily or not (``from . import x``
    counts as the package and, if ``x`` is a module, as ``x``)."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "aiodetach"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name.split(".")[0] != "aiodetach":
                continue
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}
    return found


def _reachable(start: str) -> set[str]:
    modules = {_module(p): p for p in LIBRARY}
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        todo += _imports(modules[name])
    return seen


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(SRC)))
def test_library_modules_stay_small(path: Path) -> None:
    if path.name in LARGER and path.parent == SRC:
        return
    lines = len(path.read_text().splitlines())
    assert lines < MAX_LINES, f"{path.name}: {lines} lines; split it"


@pytest.mark.parametrize("public", PUBLIC)
def test_public_modules_do_not_import_upward(public: str) -> None:
    """``errors``, ``backend``, ``testing`` and ``instrumentation`` are below the
    package face: nothing they import, however indirectly, imports
    ``aiodetach/__init__`` or the service."""
    reached = _reachable(f"aiodetach.{public}")
    assert f"aiodetach.{public}" in reached
    assert not reached & {"aiodetach", "aiodetach._service"}, sorted(reached)


def _reads_libvirt_error(node: ast.Compare) -> bool:
    for side in [node.left, *node.comparators]:
        for sub in ast.walk(side):
            if isinstance(sub, ast.Attribute) and sub.attr in ("code", "message"):
                return True
            if isinstance(sub, ast.Attribute) and _name(sub.value) == "ErrorCode":
                return True
    return False


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(SRC)))
def test_libvirt_error_codes_are_read_only_in_the_error_map(path: Path) -> None:
    """A libvirt error's code or message is compared in ``_errors_map`` only
    (``is_domain_gone``, ``is_busy``…); backends may build errors from codes."""
    if path.name == "_errors_map.py" and path.parent == SRC:
        return
    tree = ast.parse(path.read_text(), str(path))
    reads = [
        n.lineno for n in ast.walk(tree) if isinstance(n, ast.Compare) and _reads_libvirt_error(n)
    ]
    assert reads == [], f"{path.name} reads libvirt error codes at lines {reads}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_shell_outs(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for call in _calls(tree):
        name = _name(call.func)
        assert name not in {"os.system", "os.popen", "subprocess.getoutput"}, name
        assert name not in {"subprocess.getstatusoutput", "os.execl", "os.execlp"}, name
        for kw in call.keywords:
            if kw.arg == "shell":
                assert isinstance(kw.value, ast.Constant), (path.name, call.lineno)
                assert kw.value.value is False, (path.name, call.lineno)
        if name.startswith("subprocess.") and name.split(".")[-1] in RUNNERS:
            # An argument vector, never a command line a shell would parse.
            first = call.args[0] if call.args else None
            assert not isinstance(first, ast.Constant | ast.JoinedStr | ast.BinOp), (
                path.name,
                call.lineno,
            )
            if isinstance(first, ast.Call):
                assert _name(first.func) in {"list", "tuple"}, (path.name, call.lineno)


def _markup(text: str) -> bool:
    return any(
        text[i] == "<" and (text[i + 1 : i + 2].isalpha() or text[i + 1 : i + 2] == "/")
        for i in range(len(text))
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_xml_built_by_string_formatting(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    # Error messages may name a tag ("<disk>"); markup that goes anywhere else may not.
    in_raise = {id(n) for r in ast.walk(tree) if isinstance(r, ast.Raise) for n in ast.walk(r)}
    for node in ast.walk(tree):
        if id(node) in in_raise:
            continue
        if isinstance(node, ast.JoinedStr):
            parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
            assert not any(_markup(str(p)) for p in parts), (path.name, node.lineno)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    assert not _markup(side.value), (path.name, node.lineno)
        if isinstance(node, ast.Call) and _name(node.func).endswith(".format"):
            base = node.func.value if isinstance(node.func, ast.Attribute) else None
            if isinstance(base, ast.Constant) and isinstance(base.value, str):
                assert not _markup(base.value), (path.name, node.lineno)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": "vdb'/><disk"},
        {"alias": "ua-d'/><alias name='x"},
        {"alias": 'ua-d"><x'},
        {"mac": "52:54:00:12:34:56'/>"},
        {"xml": "<disk><target dev='vdb'/><!--x--></disk>"},
        {"target": "$(reboot)"},
        {"alias": "ua-d;rm -rf /"},
    ],
)
async def test_hostile_identifiers_never_reach_the_hypervisor(
    fake: FakeHypervisor, kwargs: dict[str, Any]
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    async with DetachService(backend=fake, settings=DetachSettings(timeout=1.0)) as svc:
        with pytest.raises(DetachError) as info:
            await svc.detach("vm", **kwargs)
    assert isinstance(info.value, InvalidRequest | DeviceNotFound)
    assert fake.requests == []
    assert fake.config_requests == []
    assert vm.live_device("ua-d") is not None


async def test_config_detach_sends_libvirts_own_device_xml(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    async with DetachService(backend=fake, settings=DetachSettings(timeout=1.0)) as svc:
        await svc.detach("vm", xml="<disk type='file'>  <target dev='vdb'/></disk>")
    [(_uuid, sent)] = fake.config_requests
    assert sent.startswith('<disk type="file" device="disk">')  # re-serialised by ET
    assert "ua-d" in sent


async def test_logs_never_include_domain_xml(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    for i in range(30):  # a big domain: its XML would be long
        vm.add_disk(f"vd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    vm.add_disk("vdz", alias="ua-stuck", unplug=Unplug.never())
    vm.add_disk("vdy", alias="ua-quiet", unplug=Unplug.later(0.01, emit_event=False))
    settings = DetachSettings(attempts=2, timeout=0.05)
    with capture_logs() as entries:
        async with DetachService(backend=fake, settings=settings) as svc:
            await svc.detach("vm", alias="ua-d1")
            await svc.detach("vm", alias="ua-quiet")
            with pytest.raises(DetachTimeout):
                await svc.detach("vm", alias="ua-stuck")
            with pytest.raises(DeviceNotFound):
                await svc.detach("vm", alias="ua-nope")
            fake.crash()
            fake.restart()
            await asyncio.sleep(0.3)
            await svc.detach("vm", alias="ua-d2")
    events = {str(e.get("event")) for e in entries}
    assert {"aiodetach.detached", "aiodetach.detach_timeout"} <= events
    assert "aiodetach.connection_lost" in events
    assert len(info_and_up(entries)) >= 8
    check_no_domain_xml(entries)


def test_every_test_file_is_in_the_map_of_where_tests_live() -> None:
    """docs/development.md's "Where tests live" is how a reader finds what
    tests a subject: a test file left out of it is one nobody finds."""
    tests = Path(__file__).resolve().parents[1]
    guide = (tests.parent / "docs" / "development.md").read_text()
    table = guide[guide.index("## Where tests live") : guide.index("## Proof that the tests bite")]
    missing = [
        str(path.relative_to(tests))
        for path in sorted(tests.glob("*/**/test_*.py"))
        if path.stem not in table
        and not (path.parent.name == "unit" and path.stem.startswith("test_journal"))
    ]
    assert missing == [], "add them to docs/development.md's 'Where tests live'"
