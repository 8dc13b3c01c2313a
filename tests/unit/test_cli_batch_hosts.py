"""``detach-many`` sends each line to the host it names (its ``uri``), the
others to the command's host; a line never runs against a host it did not
name, where a domain of the same name may exist."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from ._cli_in_process import CliOnFakes

OTHER = "fake://other/system"


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[CliOnFakes]:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    run = CliOnFakes(monkeypatch, capsys)
    yield run
    run.close()


def test_a_mixed_host_batch_goes_to_the_hosts_its_lines_name(cli: CliOnFakes) -> None:
    """Both hosts have a domain ``vm`` with a disk ``ua-ok0``: each line's
    detach reaches its own host only."""
    batch = (
        "vm alias=ua-ok0\n"
        f"vm alias=ua-ok0 uri={OTHER}\n"
        f'{{"domain": "vm", "alias": "ua-ok1", "uri": "{OTHER}", "persistent": false}}\n'
    )
    ran = cli("-c", "fake:///system", "detach-many", "-", "--json", stdin=batch.encode())
    assert ran.code == 0, ran
    outcomes = {o["index"]: o for o in map(json.loads, ran.out.splitlines()[:-1])}
    assert {i: (o["uri"], o["ok"]) for i, o in outcomes.items()} == {
        0: ("fake:///system", True),
        1: (OTHER, True),
        2: (OTHER, True),
    }
    assert [r.alias for r in cli.fake.requests] == ["ua-ok0"]
    assert sorted(r.alias for r in cli.other.requests) == ["ua-ok0", "ua-ok1"]
    assert cli.other.domain("vm").uuid == outcomes[1]["domain_uuid"]
    assert cli.fake.domain("vm").uuid == outcomes[0]["domain_uuid"]


def test_text_output_names_the_host_of_a_line_that_named_one(cli: CliOnFakes) -> None:
    batch = f"vm alias=ua-ok0 uri={OTHER}\nvm alias=ua-ok1\n"
    ran = cli("detach-many", "-", stdin=batch.encode())
    assert ran.code == 0, ran
    assert f"ok     vm alias=ua-ok0 on {OTHER}: 1 request(s)" in ran.out
    assert "ok     vm alias=ua-ok1: 1 request(s)" in ran.out
    assert [r.alias for r in cli.other.requests] == ["ua-ok0"]
    assert [r.alias for r in cli.fake.requests] == ["ua-ok1"]
