"""The command line keeps virsh's habits: ``-c/--connect`` before the
subcommand, ``$LIBVIRT_DEFAULT_URI``, ``-v`` anywhere, defaults in ``--help``,
``--live``/``--config``/``--persistent``/``--current`` as virsh means them
beside aiodetach's own default, and ``--dry-run``, which changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from ._cli_in_process import CliOnFakes


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[CliOnFakes]:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    run = CliOnFakes(monkeypatch, capsys)
    yield run
    run.close()


def detach_json(cli: CliOnFakes, *argv: str) -> dict[str, object]:
    ran = cli(*argv, "--json")
    assert ran.code == 0, ran
    obj = json.loads(ran.out)
    assert isinstance(obj, dict)
    return obj


OTHER = "fake://other/system"


def test_connect_before_the_subcommand_names_the_host(cli: CliOnFakes) -> None:
    shown = detach_json(cli, "-c", OTHER, "detach", "vm", "--alias", "ua-ok0")
    assert shown["uri"] == OTHER
    assert [r.alias for r in cli.other.requests] == ["ua-ok0"]
    assert cli.fake.requests == []
    shown = detach_json(cli, "--connect", OTHER, "detach", "vm", "--alias", "ua-ok1")
    assert [r.alias for r in cli.other.requests] == ["ua-ok0", "ua-ok1"]
    # The subcommand's --uri still works, and agreeing with -c is fine.
    shown = detach_json(cli, "detach", "vm", "--alias", "ua-ok0", "--uri", "fake:///system")
    assert shown["uri"] == "fake:///system"
    assert [r.alias for r in cli.fake.requests] == ["ua-ok0"]


def test_libvirt_default_uri_is_used_when_no_host_is_named(
    cli: CliOnFakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert detach_json(cli, "detach", "vm", "--alias", "ua-ok0")["uri"] == "qemu:///system"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", OTHER)
    assert detach_json(cli, "detach", "vm", "--alias", "ua-ok1")["uri"] == OTHER
    assert [r.alias for r in cli.other.requests] == ["ua-ok1"]
    # -c and --uri come first.
    shown = detach_json(cli, "-c", "fake:///system", "detach", "vm", "--alias", "ua-ok1")
    assert shown["uri"] == "fake:///system"
    assert [r.alias for r in cli.fake.requests] == ["ua-ok0", "ua-ok1"]


def test_verbose_before_or_after_the_subcommand(cli: CliOnFakes) -> None:
    for argv in (
        ["-v", "detach", "vm", "--alias", "ua-ok0"],
        ["detach", "vm", "-v", "--alias", "ua-ok1"],
    ):
        ran = cli(*argv)
        assert ran.code == 0, ran
        assert "aiodetach.detach_sent" in ran.err  # a debug-level log event
    ran = cli("detach", "vm", "--alias", "ua-ok2")
    assert "aiodetach.detach_sent" not in ran.err


def test_help_shows_the_defaults_and_what_aiodetach_changes_by_default(
    cli: CliOnFakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+ssh://h/system")
    top = cli("--help")
    assert top.code == 0
    text = " ".join(top.out.split())
    # argparse's spelling of an option with a value: 3.13 names the value once.
    assert "-c URI, --connect URI" in text or "-c, --connect URI" in text
    assert "now qemu+ssh://h/system" in text
    many = " ".join(cli("detach-many", "--help").out.split())
    assert "(default: 16)" in many
    assert "(default: 4)" in many
    assert "default 8" in many
    assert "default 20" in many
    detach = " ".join(cli("detach", "--help").out.split())
    assert "the saved definition changes too" in detach
    assert "virsh's default is --current" in detach
    for flag in ("--live", "--config", "--persistent", "--current", "--dry-run"):
        assert flag in detach


@pytest.mark.parametrize(
    ("flags", "live", "persistent"),
    [
        ([], True, True),  # aiodetach's default: both halves the domain has
        (["--live"], True, False),
        (["--config"], False, True),
        (["--live", "--config"], True, True),
        (["--persistent"], True, True),  # make the live change persistent
        (["--current"], True, False),  # it runs
        (["--no-live"], False, True),
        (["--no-persistent"], True, False),
    ],
)
def test_which_definitions_as_virsh_names_them(
    cli: CliOnFakes, flags: list[str], live: bool, persistent: bool
) -> None:
    shown = detach_json(cli, "detach", "vm", "--alias", "ua-ok0", *flags)
    assert (shown["live"], shown["persistent"]) == (live, persistent)
    assert len(cli.fake.requests) == int(live)
    assert len(cli.fake.config_requests) == int(persistent)


@pytest.mark.parametrize("flags", [["--current"], ["--persistent"], ["--config"], []])
def test_on_a_shut_off_domain_only_the_persistent_definition(
    cli: CliOnFakes, flags: list[str]
) -> None:
    cli.fake.stop_domain("vm")
    shown = detach_json(cli, "detach", "vm", "--target", "vdb", *flags)
    assert (shown["live"], shown["persistent"]) == (False, True)
    assert cli.fake.requests == []
    ran = cli("detach", "vm", "--target", "vdc", "--live")
    assert ran.code == 5
    assert "DomainNotRunning" in ran.err


def test_dry_run_shows_each_definitions_device_and_changes_nothing(cli: CliOnFakes) -> None:
    vm = cli.fake.domain("vm")
    before = (vm.xml(inactive=False), vm.xml(inactive=True))
    ran = cli("detach", "vm", "--target", "vdc", "--dry-run")
    assert ran.code == 0, ran
    assert "live        disk target='vdc'" in ran.out
    assert "would call virDomainDetachDeviceAlias('ua-ok1', VIR_DOMAIN_AFFECT_LIVE)" in ran.out
    assert "would call virDomainDetachDeviceFlags(<xml>, VIR_DOMAIN_AFFECT_CONFIG)" in ran.out
    assert "nothing was changed" in ran.out
    shown = json.loads(
        cli("detach", "vm", "--alias", "ua-ok1", "--live", "--dry-run", "--json").out
    )
    assert shown["live"]["identity"] == "disk vdc"
    assert shown["persistent"] is None
    missing = cli("detach", "vm", "--alias", "ua-nope", "--dry-run")
    assert missing.code == 4
    assert "DeviceNotFound" in missing.err
    assert (cli.fake.requests, cli.fake.config_requests) == ([], [])
    assert (vm.xml(inactive=False), vm.xml(inactive=True)) == before
