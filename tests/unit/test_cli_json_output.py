"""``--json`` means JSON on stdout for every outcome, of the documented schema.

The objects printed are checked against the models that emit them
(:mod:`aiodetach._cli_json`, strict, no extra field), and docs/cli.md is
checked to hold the field tables those models give, so the page, the
models and the output cannot drift apart.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from _probes import child_env
from aiodetach._cli_json import SCHEMA_VERSION, Output, schema_markdown

from ._cli_in_process import CliOnFakes

HELPER = Path(__file__).with_name("_cli_on_fake.py")
DOCS = Path(__file__).parents[2] / "docs" / "cli.md"
OUTPUT: TypeAdapter[Any] = TypeAdapter(Output)
FAST = ["--attempts", "1", "--timeout", "0.2"]


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[CliOnFakes]:
    run = CliOnFakes(monkeypatch, capsys)
    yield run
    run.close()


def objects(out: str) -> list[dict[str, Any]]:
    """Every stdout line, each checked against the documented schema."""
    lines = out.splitlines()
    assert lines, "nothing on stdout"
    shown = [json.loads(text) for text in lines]
    for obj in shown:
        OUTPUT.validate_python(obj)
        assert obj["schema_version"] == SCHEMA_VERSION
    return shown


def test_docs_hold_the_schema_of_the_models() -> None:
    assert schema_markdown() in DOCS.read_text(), (
        "docs/cli.md must hold aiodetach._cli_json.schema_markdown()'s tables verbatim"
    )


def test_a_success_is_a_result_object(cli: CliOnFakes) -> None:
    ran = cli("detach", "vm", "--alias", "ua-ok0", "--json")
    assert ran.code == 0, ran
    [obj] = objects(ran.out)
    assert (obj["type"], obj["ok"], obj["alias"], obj["attempts"]) == ("result", True, "ua-ok0", 1)


def test_a_usage_error_under_json_is_an_error_object_on_stdout(cli: CliOnFakes) -> None:
    ran = cli("detach", "vm", "--alias", "ua-ok0", "--timeout", "0", "--json")
    assert ran.code == 2
    [obj] = objects(ran.out)
    assert (obj["type"], obj["error"], obj["exit_code"]) == ("error", "UsageError", 2)
    assert "--timeout" in obj["message"]
    assert "--timeout" in ran.err  # and, as argparse does, on stderr


def test_a_failed_detach_says_what_was_done_and_what_it_cost(cli: CliOnFakes) -> None:
    """ua-never: removed from the persistent definition, then the guest never
    released it: the JSON says so (persistent_done), with its one request."""
    ran = cli("detach", "vm", "--alias", "ua-never", *FAST, "--json")
    assert ran.code == 7, ran
    [obj] = objects(ran.out)
    assert obj["type"] == "error"
    assert obj["error"] == "DetachTimeout"
    assert obj["persistent_done"] is True
    assert obj["attempts"] == 1
    assert obj["elapsed"] >= 0.2
    assert obj["exit_code"] == 7
    missing = cli("detach", "nope", "--alias", "ua-ok0", "--json")
    [obj] = objects(missing.out)
    assert (missing.code, obj["error"], obj["libvirt_code"]) == (3, "DomainNotFound", 42)
    assert obj["persistent_done"] is False


def test_a_failure_in_plain_text_says_the_persistent_half_was_done(cli: CliOnFakes) -> None:
    ran = cli("detach", "vm", "--alias", "ua-never", *FAST)
    assert ran.code == 7
    assert "already removed from the persistent definition" in ran.err


def test_a_batch_prints_one_object_per_device_then_a_summary(cli: CliOnFakes) -> None:
    batch = b"vm alias=ua-ok0\nvm alias=ua-never persistent=false\nnope alias=x\n"
    ran = cli("detach-many", "-", *FAST, "--json", stdin=batch)
    assert ran.code == 12, ran
    *outcomes, summary = objects(ran.out)
    assert sorted(o["index"] for o in outcomes) == [0, 1, 2]
    by_index = {o["index"]: o for o in outcomes}
    assert by_index[0]["ok"]
    assert by_index[0]["alias"] == "ua-ok0"
    assert by_index[1]["error"] == "DetachTimeout"
    assert by_index[1]["persistent_done"] is False
    assert by_index[1]["attempts"] == 1
    assert by_index[2]["error"] == "DomainNotFound"
    assert summary == {
        "schema_version": SCHEMA_VERSION,
        "type": "summary",
        "total": 3,
        "detached": 1,
        "failed": 2,
        "exit_code": 12,
    }


async def test_a_batch_streams_each_device_as_it_ends() -> None:
    """The first device's line comes while another device still waits (60 s
    windows it cannot reach before the test stops it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        "detach-many",
        "-",
        "--json",
        "--attempts",
        "1",
        "--timeout",
        "60",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=child_env(),
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(b"vm alias=ua-never persistent=false\nvm alias=ua-ok0\n")
    proc.stdin.close()
    try:
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert proc.returncode is None  # the batch goes on
        OUTPUT.validate_python(first)
        assert (first["type"], first["index"], first["ok"]) == ("outcome", 1, True)
    finally:
        proc.kill()
        await proc.wait()


def test_a_dry_run_is_a_dry_run_object(cli: CliOnFakes) -> None:
    ran = cli("detach", "vm", "--target", "vdc", "--dry-run", "--json")
    assert ran.code == 0, ran
    [obj] = objects(ran.out)
    assert obj["type"] == "dry_run"
    assert obj["live"]["alias"] == "ua-ok1"


@pytest.mark.parametrize("as_json", [True, False])
def test_watch_into_a_reader_that_leaves_exits_quietly(as_json: bool) -> None:
    """``aiodetach watch --json | head -1``: the reader leaves after one line;
    the command exits 0 and says nothing (no "Broken pipe", no traceback)."""
    head = subprocess.Popen(
        ["head", "-1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert head.stdin is not None
    assert head.stdout is not None
    watch = subprocess.run(
        [sys.executable, str(HELPER), "watch", "vm", *(["--json"] if as_json else [])],
        stdout=head.stdin,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        env=child_env(AIODETACH_FAKE_EVENTS="1"),
        check=False,
    )
    head.stdin.close()
    shown = head.stdout.read()
    head.stdout.close()
    head.wait(timeout=30)
    assert watch.returncode == 0, watch.stderr
    assert "Broken pipe" not in watch.stderr, watch.stderr
    assert "Traceback" not in watch.stderr, watch.stderr
    if as_json:
        [obj] = objects(shown)
        assert (obj["type"], obj["domain"], obj["alias"]) == ("event", "vm", "ua-x")
    else:
        assert "device-removed" in shown
