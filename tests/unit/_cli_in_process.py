"""The ``aiodetach`` command run in this process, on fake hypervisors (a test
helper): ``main(argv)`` with the CLI's service and fleet classes swapped for
ones on :func:`_cli_on_fake.build` (``fake``) and
:func:`_cli_on_fake.build_other` (``other``, the hosts whose URI contains
"other"), its stdin given, its exit code, stdout and stderr returned."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass

import pytest
import structlog

from aiodetach import _cli
from aiodetach.testing import FakeHypervisor

from ._cli_on_fake import build, build_other, fake_classes


@dataclass
class Ran:
    code: int
    out: str
    err: str


class CliOnFakes:
    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        fake: FakeHypervisor | None = None,
    ) -> None:
        self.fake = fake if fake is not None else build()
        self.other = build_other()
        service, fleet = fake_classes(self.fake, self.other)
        monkeypatch.setattr(_cli, "DetachService", service)
        monkeypatch.setattr(_cli, "DetachFleet", fleet, raising=False)
        self._monkeypatch = monkeypatch
        self._capsys = capsys

    def __call__(self, *argv: str, stdin: bytes = b"") -> Ran:
        self._monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        self._capsys.readouterr()
        try:
            code = _cli.main(list(argv))
        finally:
            structlog.reset_defaults()  # main() configured it for its run
        out, err = self._capsys.readouterr()
        return Ran(code, out, err)

    def close(self) -> None:
        self.fake.cancel_timers()
        self.other.cancel_timers()
