"""``aiodetach demo`` is a thin entry: the demo lives in the repository's lab."""

from __future__ import annotations

import pytest

from aiodetach import _cli


@pytest.mark.parametrize("argv", [["demo"], ["demo", "--uri", "qemu:///system", "--no-booted"]])
def test_demo_says_how_to_run_the_labs_demo(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "bash examples/demo.sh" in err
    assert "aiodetach-lab demo" in err
