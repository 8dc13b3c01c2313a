"""The command line names a domain as virsh does: by name, by UUID, or by a
running domain's ID (a number is read as an ID first), on libvirt's own
``test:///default`` driver, where the running domain ``test`` has an ID (1 in a fresh process)."""

from __future__ import annotations

import json

import pytest
import structlog

from aiodetach._cli import main

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def dry_run(capsys: pytest.CaptureFixture[str], uri: str, domain: str) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(
            ["-c", uri, "detach", domain, "--target", "vda", "--config", "--dry-run", "--json"]
        )
    finally:
        structlog.reset_defaults()
    return code, capsys.readouterr().out


@pytest.mark.parametrize("domain", ["ID", "test", TEST_UUID, TEST_UUID.upper().replace("-", "")])
def test_a_domain_by_id_name_or_uuid(
    test_uri: str, test_id: str, capsys: pytest.CaptureFixture[str], domain: str
) -> None:
    if domain == "ID":
        domain = test_id
    code, out = dry_run(capsys, test_uri, domain)
    assert code == 0, out
    shown = json.loads(out)
    assert (shown["domain_name"], shown["domain_uuid"]) == ("test", TEST_UUID)
    assert shown["persistent"]["device"].startswith("disk target='vda'")
    assert shown["live"] is None


def test_a_number_no_running_domain_has_is_a_name(
    test_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = dry_run(capsys, test_uri, "4242")
    assert code == 3, out
    shown = json.loads(out)
    assert (shown["error"], shown["domain"]) == ("DomainNotFound", "4242")
