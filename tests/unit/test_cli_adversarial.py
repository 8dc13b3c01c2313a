"""The command line as an operator and a script abuse it: each test is an
attack on a promise of docs/cli.md or docs/errors.md that once broke
(abbreviated options, batch lines naming a key twice, aiodetach's own
``--no-live``/``--no-persistent`` on a domain lacking the other half, a reader
of stdout that left before a failure was printed, ``watch`` ended by SIGTERM
or named a domain that does not exist).  On the fake hypervisor, through the
command only: in this process, or in a child process where signals, pipes
and exit statuses are what is tested."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from _probes import child_env
from aiodetach._cli_json import Output

from ._cli_in_process import CliOnFakes

HELPER = Path(__file__).with_name("_cli_on_fake.py")
OUTPUT: TypeAdapter[object] = TypeAdapter(Output)
GUARD = 120  # seconds: turns a hang into a failure; no test waits for it


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[CliOnFakes]:
    run = CliOnFakes(monkeypatch, capsys)
    yield run
    run.close()


def only_object(out: str) -> dict[str, object]:
    """The one JSON line on stdout, checked against the documented schema."""
    [text] = out.splitlines()
    obj = json.loads(text)
    OUTPUT.validate_python(obj)
    assert isinstance(obj, dict)
    return obj


def nothing_sent(cli: CliOnFakes) -> None:
    for fake in (cli.fake, cli.other):
        assert (fake.requests, fake.config_requests) == ([], [])


# -- --json: every outcome is JSON on stdout ---------------------------------------------


@pytest.mark.parametrize("spelling", ["--js", "--jso", "--json=yes"])
def test_json_as_argparse_reads_it_gets_its_usage_error_as_json(
    cli: CliOnFakes, spelling: str
) -> None:
    """argparse takes an unambiguous prefix of ``--json`` as ``--json`` (and
    a value given to it is a usage error): whatever argparse made of it, a
    usage error after it is JSON on stdout, not text only."""
    ran = cli("detach", "vm", "--alias", "ua-ok0", "--timeout", "0", spelling)
    assert ran.code == 2
    obj = only_object(ran.out)
    assert (obj["type"], obj["error"], obj["exit_code"]) == ("error", "UsageError", 2)
    nothing_sent(cli)


def test_an_abbreviated_json_option_still_means_json(cli: CliOnFakes) -> None:
    ran = cli("detach", "vm", "--alias", "ua-ok0", "--js")
    assert ran.code == 0, ran
    assert only_object(ran.out)["type"] == "result"


# -- a batch line never goes to a host (or domain) it did not name once ------------------


@pytest.mark.parametrize(
    "batch",
    [
        "vm alias=ua-ok0 uri=fake://other/system uri=qemu:///system\n",
        "vm alias=ua-ok0 uri=qemu:///system uri=fake://other/system\n",
        '{"domain": "vm", "alias": "ua-ok0", "uri": "fake://other/system", '
        '"uri": "qemu:///system"}\n',
        "other domain=vm alias=ua-ok0\n",
        "vm alias=ua-ok1 alias=ua-ok0\n",
        '{"domain": "vm", "alias": "ua-ok1", "alias": "ua-ok0"}\n',
    ],
)
def test_a_batch_line_naming_a_key_twice_is_refused_before_anything_is_sent(
    cli: CliOnFakes, batch: str
) -> None:
    """The last of two hosts (domains, aliases) used to win in silence: a line
    naming ``uri`` twice ran on one of them, ``DOMAIN domain=…`` on the
    second domain.  Such a line is a bad line: the batch fails with exit 2
    and nothing done, on either host."""
    ran = cli("detach-many", "-", "--json", stdin=("vm alias=ua-ok2\n" + batch).encode())
    assert ran.code == 2, ran
    obj = only_object(ran.out)
    assert (obj["type"], obj["error"]) == ("error", "InvalidRequest")
    assert "line 2" in str(obj["message"])
    assert "twice" in str(obj["message"])
    nothing_sent(cli)


# -- aiodetach's own flags on a domain that lacks the half they leave --------------------


def test_no_live_on_a_transient_domain_is_what_config_is(cli: CliOnFakes) -> None:
    """``--no-live`` is ``--config`` (its help says so): on a transient domain
    both are DomainNotPersistent, exit 5, not a DeviceNotFound (exit 4) about
    "the  definition"."""
    cli.fake.add_domain("t", persistent=False).add_disk("vdb", alias="ua-a")
    for flag in ("--config", "--no-live"):
        ran = cli("detach", "t", "--target", "vdb", flag, "--json")
        assert ran.code == 5, (flag, ran)
        obj = only_object(ran.out)
        assert (obj["error"], obj["persistent_done"]) == ("DomainNotPersistent", False), flag
    nothing_sent(cli)


def test_no_persistent_on_a_shut_off_domain_is_what_live_is(cli: CliOnFakes) -> None:
    """``--no-persistent`` leaves the running guest only: on a shut-off domain
    that is DomainNotRunning, exit 5 (as ``--live``), and the persistent
    definition is not touched."""
    cli.fake.add_domain("s", running=False).add_disk("vdb", alias="ua-a")
    for flag in ("--live", "--no-persistent"):
        ran = cli("detach", "s", "--target", "vdb", flag, "--json")
        assert ran.code == 5, (flag, ran)
        assert only_object(ran.out)["error"] == "DomainNotRunning", flag
    nothing_sent(cli)


# -- a reader of stdout that left does not change the exit status of a failure -----------


def _into_a_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """The command with stdout a pipe whose reader already left (every write
    fails with EPIPE), as in ``aiodetach … --json | true``."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, str(HELPER), *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=GUARD,
            env=child_env(),
            check=False,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["detach", "nosuch", "--alias", "ua-ok0", "--json"], 3),
        (["detach", "vm", "--alias", "ua-nope", "--json"], 4),
        (["detach", "vm", "--alias", "ua-ok0", "--timeout", "0", "--json"], 2),
        (["detach-many", "-", "--concurrency", "0", "--json"], 2),
    ],
)
def test_a_failure_keeps_its_exit_status_when_the_reader_left(argv: list[str], code: int) -> None:
    """Without ``--json`` the failure goes to stderr and the status says it;
    with ``--json`` into a reader that left, it used to be 0 (the failure
    looked like a success) or a BrokenPipeError traceback, exit 1."""
    ran = _into_a_closed_pipe(*argv)
    assert ran.returncode == code, ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr


async def test_an_interrupt_keeps_130_when_the_reader_left() -> None:
    """Ctrl-C during a detach whose JSON reader left: the report cannot be
    printed, the status still says the command was interrupted."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        *("detach", "vm", "--alias", "ua-never", "--json", "--attempts", "2", "--timeout", "30"),
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    os.close(write_end)
    try:
        await _read_until(proc, '"event": "aiodetach.detach_sent"')
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.wait_for(proc.communicate(), GUARD)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_an_interrupted_detach_names_its_request_as_given(signum: signal.Signals) -> None:
    """The report's ``request`` is the command's device options as given
    (docs/cli.md), as a batch line's is: not every option, the absent as null."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        *("detach", "vm", "--target", "vdy", "--json", "--attempts", "2", "--timeout", "30"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        await _read_until(proc, '"event": "aiodetach.detach_sent"')
        proc.send_signal(signum)
        out, err = await asyncio.wait_for(proc.communicate(), GUARD)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 128 + signum, err.decode()
    device, summary = (json.loads(text) for text in out.decode().splitlines())
    assert device["request"] == {"domain": "vm", "target": "vdy"}
    assert (device["type"], device["alias"], device["state"]) == (
        "interrupted",
        "ua-never",
        "request_outstanding",
    )
    assert (summary["type"], summary["signal"]) == ("interrupted_summary", signum.name)
    assert {device["schema_version"], summary["schema_version"]} == {1}


async def _read_until(proc: asyncio.subprocess.Process, text: str) -> str:
    assert proc.stderr is not None
    seen = ""
    while text not in seen:
        line = (await asyncio.wait_for(proc.stderr.readline(), GUARD)).decode()
        assert line, f"the command ended before {text!r}: {seen}"
        seen += line
    return seen


# -- watch --------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_watch_ended_by_a_signal_closes_and_exits_128_plus_it(
    signum: signal.Signals, code: int
) -> None:
    """SIGTERM used to kill ``watch`` outright (no close, status -15 to a
    script); like every command it closes and exits 143 (130 for Ctrl-C),
    and what it printed under ``--json`` stays JSON Lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        *("watch", "vm", "--json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(AIODETACH_FAKE_EVENTS="1"),
    )
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), GUARD)
        proc.send_signal(signum)
        out, err = await asyncio.wait_for(proc.communicate(), GUARD)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == code, err.decode()
    assert "Traceback" not in err.decode()
    for text in (first + out).decode().splitlines():
        obj = json.loads(text)
        OUTPUT.validate_python(obj)
        assert (obj["type"], obj["domain"]) == ("event", "vm")


def test_watch_of_a_domain_that_does_not_exist_says_so() -> None:
    """As virsh's ``event --domain``: a domain that is not there is
    DomainNotFound, exit 3, at once; it used to wait for its events forever."""
    ran = subprocess.run(
        [sys.executable, str(HELPER), "watch", "no-such-vm", "--json"],
        capture_output=True,
        text=True,
        timeout=GUARD,
        env=child_env(),
        check=False,
    )
    assert ran.returncode == 3, ran.stderr
    obj = only_object(ran.stdout)
    assert (obj["type"], obj["error"], obj["domain"]) == ("error", "DomainNotFound", "no-such-vm")


# -- input files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line", ["vm alias=ua-ok0", '{"domain": "vm", "alias": "ua-ok0"}'], ids=["words", "json"]
)
def test_a_batch_saved_with_a_byte_order_mark_reads_as_without(cli: CliOnFakes, line: str) -> None:
    """UTF-8 with a BOM (Windows editors, PowerShell 5's ``Out-File``) is
    UTF-8 text: its first line used to name domain ``'\\ufeffvm'`` (sent to
    libvirt, DomainNotFound) or be refused as a JSON line that was not."""
    ran = cli("detach-many", "-", "--json", stdin=b"\xef\xbb\xbf" + line.encode() + b"\n")
    assert ran.code == 0, ran
    first, summary = (json.loads(text) for text in ran.out.splitlines())
    assert (first["ok"], first["domain_name"], first["alias"]) == (True, "vm", "ua-ok0")
    assert summary["exit_code"] == 0


@pytest.mark.parametrize(
    "argv",
    [["detach-many", "-"], ["detach-many"], ["detach", "vm", "--xml-file", "-"]],
    ids=["dash", "default", "xml-file"],
)
def test_reading_stdin_that_is_closed_is_a_usage_error(argv: list[str]) -> None:
    """``aiodetach detach-many <&-`` (a service started with no stdin):
    Python has no ``sys.stdin`` then; reading it was an AttributeError
    traceback, exit 1.  It is an input that cannot be read: exit 2, JSON too."""
    ran = subprocess.run(
        ["bash", "-c", 'exec "$0" "$@" <&-', sys.executable, str(HELPER), *argv, "--json"],
        capture_output=True,
        text=True,
        timeout=GUARD,
        env=child_env(),
        check=False,
    )
    assert ran.returncode == 2, ran.stderr
    assert "Traceback" not in ran.stderr
    obj = only_object(ran.stdout)
    assert (obj["error"], obj["exit_code"]) == ("UsageError", 2)
    assert "stdin is closed" in str(obj["message"])


@pytest.mark.parametrize(
    ("closed", "argv", "code"),
    [
        ("2>&-", ["detach", "no-such-vm", "--alias", "ua-ok0"], 3),
        ("2>&-", ["detach", "vm", "--alias", "ua-ok0"], 0),
        ("2>&-", ["detach", "vm", "--alias", "ua-ok0", "--json", "-v"], 0),
        (">&-", ["detach", "no-such-vm", "--alias", "ua-ok0", "--json"], 3),
        (">&-", ["detach", "vm", "--alias", "ua-ok0", "--timeout", "0", "--json"], 2),
        (">&-", ["detach", "vm", "--alias", "ua-ok0"], 0),
    ],
)
def test_a_command_started_with_stdout_or_stderr_closed_keeps_its_exit_status(
    closed: str, argv: list[str], code: int
) -> None:
    """Python has no ``sys.stderr`` (``sys.stdout``) then: the progress
    display asked it ``isatty()`` and the command died with an
    AttributeError no one could read, exit 1 for every outcome."""
    ran = subprocess.run(
        ["bash", "-c", f'exec "$0" "$@" {closed}', sys.executable, str(HELPER), *argv],
        capture_output=True,
        text=True,
        timeout=GUARD,
        env=child_env(),
        check=False,
    )
    assert ran.returncode == code, (ran.stdout, ran.stderr)
