"""``detach-many`` names a batch line's domain as ``detach`` names one: by
name, UUID, or (as virsh reads a number) a running domain's ID first
(docs/cli.md, "virsh's habits").  On libvirt's ``test:///default`` driver,
where the running domain ``test`` has an ID; the fake hypervisor has no IDs.
The library reads the number (aiodetach._libvirt_find), so a line needs no
look-up before the batch starts."""

from __future__ import annotations

import io
import json
import sys

import pytest
import structlog

from aiodetach._cli import main


def batch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], uri: str, line: str
) -> tuple[int, list[dict[str, object]]]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(line.encode())))
    capsys.readouterr()
    try:
        code = main(["-c", uri, "detach-many", "-", "--json"])
    finally:
        structlog.reset_defaults()
    return code, [json.loads(text) for text in capsys.readouterr().out.splitlines()]


def test_a_batch_line_names_a_running_domain_by_its_id(
    test_uri: str, test_id: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A device the domain lacks: the domain is found (DeviceNotFound), nothing changes.
    code, shown = batch(monkeypatch, capsys, test_uri, f"{test_id} alias=ua-nope\n")
    assert code == 12
    assert (shown[0]["error"], shown[0]["domain"]) == ("DeviceNotFound", "test")


def test_a_batch_line_names_a_domain_by_name(
    test_uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same line by name: what the ID should give."""
    code, shown = batch(monkeypatch, capsys, test_uri, "test alias=ua-nope\n")
    assert code == 12
    assert (shown[0]["error"], shown[0]["domain"]) == ("DeviceNotFound", "test")
