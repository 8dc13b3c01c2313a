"""Every bad input to the ``aiodetach`` command is a typed exit, never a
traceback: bad option values are argparse-style usage errors (exit 2) naming
the option, unreadable input files too, and no command line at all makes
the command fail with a traceback (exit 1)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from aiodetach._cli import EXIT_CODES
from aiodetach._cli_json import Output
from aiodetach.testing import FakeHypervisor, Unplug

from ._cli_in_process import CliOnFakes

OUTPUT: TypeAdapter[object] = TypeAdapter(Output)
TYPED_EXITS = {0, 2, 12, 13, 130} | {code for _cls, code in EXIT_CODES}


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[CliOnFakes]:
    run = CliOnFakes(monkeypatch, capsys)
    yield run
    run.close()


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["detach-many", "-", "--metrics-port", "70000"], "--metrics-port"),
        (["detach-many", "-", "--metrics-port", "-1"], "--metrics-port"),
        (["detach-many", "-", "--metrics-port", "9" * 5000], "--metrics-port"),
        (["watch", "--metrics-port", "http"], "--metrics-port"),
        (["detach", "vm", "--alias", "ua-ok0", "--timeout", "0"], "--timeout"),
        (["detach", "vm", "--alias", "ua-ok0", "--timeout", "nan"], "--timeout"),
        (["detach", "vm", "--alias", "ua-ok0", "--timeout", "inf"], "--timeout"),
        (["detach", "vm", "--alias", "ua-ok0", "--timeout", "1e400"], "--timeout"),
        (["detach", "vm", "--alias", "ua-ok0", "--attempts", "0"], "--attempts"),
        (["detach", "vm", "--alias", "ua-ok0", "--attempts", "1001"], "--attempts"),
        (["detach-many", "-", "--concurrency", "0"], "--concurrency"),
        (["detach-many", "-", "--per-domain", "-3"], "--per-domain"),
        (["detach", "vm", "--alias", "ua-ok0", "--uri", ""], "--uri"),
        (["-c", "qemu:///\x00", "detach", "vm", "--alias", "ua-ok0"], "-c/--connect"),
        (["detach", "vm", "--alias", "ua-ok0", "--journal", "\x00"], "--journal"),
        (["detach", "vm", "--alias", "ua-ok0", "--current", "--live"], "--current"),
        (["detach", "vm", "--alias", "ua-ok0", "--current", "--no-live"], "--current"),
        (["detach", "vm", "--alias", "ua-ok0", "--live", "--no-live"], "--live"),
        (["detach", "vm", "--alias", "ua-ok0", "--config", "--no-persistent"], "--config"),
        (["detach", "vm", "--alias", "ua-ok0", "--no-live", "--no-persistent"], "nothing"),
        (["-c", "fake:///a", "detach", "vm", "--alias", "ua-ok0", "--uri", "fake:///b"], "--uri"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_option(
    cli: CliOnFakes, argv: list[str], option: str
) -> None:
    ran = cli(*argv)
    assert ran.code == 2, ran
    assert "Traceback" not in ran.err
    assert "usage: aiodetach" in ran.err
    assert option in ran.err.splitlines()[-1], ran.err
    assert cli.fake.requests == []
    assert cli.fake.config_requests == []


def test_a_metrics_port_in_use_is_a_usage_error(cli: CliOnFakes) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ran = cli("detach-many", "-", "--metrics-port", port, stdin=b"vm alias=ua-ok0\n")
    assert ran.code == 2, ran
    assert "--metrics-port" in ran.err
    assert "Traceback" not in ran.err
    assert cli.fake.requests == []


def test_a_batch_that_is_not_utf8_is_a_usage_error(cli: CliOnFakes, tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_bytes("vm alias=ua-ok0 # caf\xe9\n".encode("latin-1"))
    for argv, stdin in (
        (["detach-many", str(batch)], b""),
        (["detach-many", "-"], batch.read_bytes()),
    ):
        ran = cli(*argv, stdin=stdin)
        assert ran.code == 2, ran
        assert "Traceback" not in ran.err
        assert "not UTF-8 text (byte 0xe9" in ran.err
    assert cli.fake.requests == []


def test_device_xml_that_cannot_be_read_is_a_usage_error(cli: CliOnFakes, tmp_path: Path) -> None:
    bad = tmp_path / "dev.xml"
    bad.write_bytes(b"<disk>\xff</disk>")
    for path in (str(bad), str(tmp_path), str(tmp_path / "missing.xml")):
        ran = cli("detach", "vm", "--xml-file", path)
        assert ran.code == 2, ran
        assert "argument --xml-file" in ran.err, ran.err
        assert "Traceback" not in ran.err


def test_a_bad_batch_line_is_a_typed_error_before_anything_is_sent(cli: CliOnFakes) -> None:
    for text in (b"vm alias=ua-ok0\nvm nokey\n", b'{"domain": "vm"}\n', b"[" * 100000 + b"\n"):
        ran = cli("detach-many", "-", stdin=text)
        assert ran.code == 2, ran
        assert "InvalidRequest" in ran.err
        assert "Traceback" not in ran.err
    assert cli.fake.requests == []


# -- any command line ------------------------------------------------------------------

WORDS = [
    "detach", "detach-many", "demo", "-", "--", "-v", "--verbose", "-c", "--connect", "--uri",
    "--json", "--dry-run", "--live", "--config", "--persistent", "--current", "--no-live",
    "--no-persistent", "--alias", "--target", "--mac", "--xml-file", "--attempts", "--timeout",
    "--concurrency", "--per-domain", "--metrics-port", "--metrics-addr", "--journal",
    "--progress", "-h", "--version", "vm", "other", "fake://other/system", "ua-ok0", "ua-ok1",
    "vdb", "vdc", "52:54:00:00:00:01", "0", "1", "-1", "2", "70000", "nan", "inf", "1e400",
    "0.01", "9" * 400, "", " ", "\x00", "\udcff", "é", "3a1f7c52-0b6e-4d84-9e0f-5c2d1b7a9e61",
    "BAD_BATCH", "BATCH", "DIR", "MISSING",
]  # fmt: skip
"""Subcommands, options and values, good and bad; ``watch`` is left out (it
runs until interrupted), as are devices that are never released."""


def _fuzz_fake() -> FakeHypervisor:
    fake = FakeHypervisor()
    vm = fake.add_domain("vm", uuid="3a1f7c52-0b6e-4d84-9e0f-5c2d1b7a9e61")
    for i in range(3):
        vm.add_disk(f"vd{chr(ord('b') + i)}", alias=f"ua-ok{i}", unplug=Unplug.now())
    vm.add_interface("52:54:00:00:00:01", alias="ua-net0", unplug=Unplug.now())
    fake.add_domain("other")
    return fake


_word = st.one_of(st.sampled_from(WORDS), st.text(max_size=6))
_unit = st.one_of(
    st.lists(_word, min_size=1, max_size=2),
    st.sampled_from(
        [
            ["vm"],
            ["--alias", "ua-ok1"],
            ["--target", "vdc"],
            ["--mac", "52:54:00:00:00:01"],
            ["--json"],
            ["--dry-run"],
            ["--live"],
            ["--config"],
            ["--persistent"],
            ["--current"],
            ["--attempts", "1"],
            ["--timeout", "0.01"],
            ["-c", "fake://other/system"],
        ]
    ),
)
_argv = st.one_of(
    st.lists(_word, max_size=9),
    st.builds(
        lambda head, command, rest: [*head, command, *(w for unit in rest for w in unit)],
        st.lists(st.sampled_from(["-v", "--json", "-c", "fake:///system"]), max_size=2),
        st.sampled_from(["detach", "detach-many", "demo"]),
        st.lists(_unit, max_size=6),
    ),
)
_stdin = st.one_of(
    st.just(b""),
    st.sampled_from([b"vm alias=ua-ok1\n", b"vm alias=ua-ok2 uri=fake://other/system\n", b"\xff"]),
    st.binary(max_size=40),
)


@settings(
    max_examples=int(os.environ.get("AIODETACH_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(argv=_argv, stdin=_stdin)
def test_no_command_line_ends_in_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
    stdin: bytes,
) -> None:
    monkeypatch.chdir(tmp_path)  # a --journal value is created here
    (tmp_path / "BAD_BATCH").write_bytes(b"vm alias=ua-ok0\n\xff\xfe\n")
    (tmp_path / "BATCH").write_text("vm alias=ua-ok0\nother alias=ua-x\n")
    (tmp_path / "DIR").mkdir(exist_ok=True)
    cli = CliOnFakes(monkeypatch, capsys, fake=_fuzz_fake())
    try:
        ran = cli(*argv, stdin=stdin)
    finally:
        cli.close()
    event(f"exit {ran.code}")
    assert "Traceback" not in ran.err, (argv, ran.err[-2000:])
    assert ran.code in TYPED_EXITS, (argv, ran)
    wants_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    if wants_json and ran.code != 0:
        lines = ran.out.splitlines()
        assert lines, (argv, ran)
        for text in lines:
            OUTPUT.validate_python(json.loads(text))
        assert json.loads(lines[-1])["exit_code"] == ran.code
