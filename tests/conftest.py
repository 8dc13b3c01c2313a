"""Fixtures shared by every tier.

The test trees are laid out by what is real:

- ``tests/unit``: the library against :class:`aiodetach.testing.FakeHypervisor`
  (a fake, named so); no libvirtd, runs in seconds;
- ``tests/testdriver``: the event-loop bridge and the real backend against
  libvirt's own ``test:///default`` driver (in-process, no daemon);
- ``tests/real``: a real libvirtd + QEMU (the lab, :mod:`aiodetach_lab`, starts
  what is missing); its conftest marks every test there ``qemu``.

``-m "not qemu"`` runs the first two.  With ``AIODETACH_TEST_INSTALLED=1`` the
session refuses to run unless ``aiodetach`` is imported from an installed
wheel (site-packages), not from the source tree.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import structlog

import aiodetach
from aiodetach import DetachService, DetachSettings
from aiodetach.testing import FakeHypervisor


def pytest_report_header() -> str:
    return f"aiodetach {aiodetach.__version__} from {Path(aiodetach.__file__).parent}"


def pytest_configure(config: pytest.Config) -> None:
    # structlog's default console renderer formats exceptions with rich when
    # rich is importable (twine, in the release group, pulls it in), which is
    # orders of magnitude slower: the model test, whose raising hook logs a
    # traceback at every step, then ran for many minutes.  Same output as the
    # defaults otherwise, and the same in every virtualenv.
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.StackInfoRenderer(),
            structlog.dev.set_exc_info,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("AIODETACH_TEST_INSTALLED") == "1":
        where = Path(aiodetach.__file__).resolve()
        if "site-packages" not in where.parts:
            raise pytest.UsageError(f"aiodetach imported from {where}, not an installed wheel")


@pytest.fixture(autouse=True)
def _structlog_config() -> Iterator[None]:
    """structlog's configuration is process-global, and the command line is
    the one place that sets it (tests call ``main()`` in-process): each test
    gets back the configuration it started with, so one test's renderer,
    level or stream never leaks into the next."""
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


@pytest.fixture
def fake() -> Iterator[FakeHypervisor]:
    hv = FakeHypervisor()
    yield hv
    hv.cancel_timers()


@pytest.fixture
def fast() -> DetachSettings:
    """Short timeouts so retry paths run in milliseconds."""
    return DetachSettings(attempts=3, timeout=0.2, reconnect_timeout=2.0)


@pytest.fixture
async def svc(fake: FakeHypervisor, fast: DetachSettings) -> AsyncIterator[DetachService]:
    async with DetachService(backend=fake, settings=fast) as service:
        yield service
    assert service.pending() == []


@pytest.fixture
def make_svc(fake: FakeHypervisor) -> Callable[..., DetachService]:
    def make(**settings: object) -> DetachService:
        return DetachService(backend=fake, settings=DetachSettings(**settings))  # type: ignore[arg-type]

    return make
