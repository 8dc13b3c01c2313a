"""The library writes nothing of its own: with structlog left unconfigured its
events are stdlib ``logging`` records of the ``aiodetach`` logger, so the host's
``logging`` configuration decides (silent until it configures anything); a host
that configured structlog gets them through its own processors.

Each case runs in a new interpreter: structlog's and logging's configuration are
process-wide, and the test session configures structlog itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from _probes import child_env, without_slow_steps

DETACH = """
import asyncio
from aiodetach import DetachService, DetachSettings
from aiodetach.testing import FakeHypervisor

async def detach():
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1")
    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:
        await svc.detach("vm", alias="ua-disk1")
    fake.cancel_timers()

asyncio.run(detach())
"""


def _run(setup: str, after: str = "") -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(setup) + DETACH + textwrap.dedent(after)
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return without_slow_steps(done)


def test_nothing_on_stdout_or_stderr_when_the_host_logs_warnings_only() -> None:
    done = _run("import logging\nlogging.basicConfig(level=logging.WARNING)\n")
    assert done.stdout == ""
    assert done.stderr == ""


def test_nothing_printed_when_the_host_configured_no_logging_at_all() -> None:
    # No handler anywhere: logging's last resort would print warnings to stderr,
    # aiodetach's NullHandler keeps it from doing so for the library's events.
    done = _run(
        "",
        after="""
        from aiodetach._log import get_log
        get_log().warning("aiodetach.connection_lost", uri="test", reason="probe")
        """,
    )
    assert done.stdout == ""
    assert done.stderr == ""


def test_debug_logging_shows_the_events_with_their_fields() -> None:
    done = _run("import logging\nlogging.basicConfig(level=logging.DEBUG)\n")
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    sent = [ln for ln in lines if "aiodetach.detach_sent" in ln]
    assert sent == [
        "INFO:aiodetach:aiodetach.detach_sent domain=vm alias=ua-disk1 attempt=1 attempts=8"
    ], done.stderr
    for event in ("connected", "persistent_detached", "detached", "closed"):
        assert any(f"aiodetach:aiodetach.{event}" in ln for ln in lines), done.stderr


def test_stdlib_records_carry_the_event_and_fields_as_attributes() -> None:
    done = _run(
        """
        import json, logging
        class Keep(logging.Handler):
            def emit(self, record):
                print(json.dumps({"logger": record.name, "level": record.levelname,
                                  "event": record.event,
                                  "domain": getattr(record, "domain", None),
                                  "alias": getattr(record, "alias", None),
                                  "attempt": getattr(record, "attempt", None)}))
        logging.getLogger("aiodetach").addHandler(Keep())
        logging.getLogger("aiodetach").setLevel(logging.DEBUG)
        """
    )
    records = [json.loads(ln) for ln in done.stdout.splitlines()]
    assert {r["logger"] for r in records} == {"aiodetach"}
    by_event = {r["event"]: r for r in records}
    assert by_event["aiodetach.detach_sent"] == {
        "logger": "aiodetach",
        "level": "INFO",
        "event": "aiodetach.detach_sent",
        "domain": "vm",
        "alias": "ua-disk1",
        "attempt": 1,
    }
    assert by_event["aiodetach.connected"]["level"] == "DEBUG"
    assert "aiodetach.detached" in by_event
    assert done.stderr == ""


def test_a_host_that_configured_structlog_gets_the_events_through_its_processors() -> None:
    done = _run(
        """
        import json, sys, structlog
        def keep(logger, method, event_dict):
            print(json.dumps({"method": method, **event_dict}), file=sys.stdout)
            raise structlog.DropEvent
        structlog.configure(processors=[keep])
        """
    )
    events = [json.loads(ln) for ln in done.stdout.splitlines()]
    sent = [e for e in events if e["event"] == "aiodetach.detach_sent"]
    assert sent == [
        {
            "method": "info",
            "event": "aiodetach.detach_sent",
            "domain": "vm",
            "alias": "ua-disk1",
            "attempt": 1,
            "attempts": 8,
        }
    ]
    assert "aiodetach.detached" in {e["event"] for e in events}


def test_structlog_configured_after_import_is_used_from_then_on() -> None:
    done = _run(
        """
        import logging
        logging.basicConfig(level=logging.DEBUG)
        import aiodetach  # imported before the host configures structlog
        import json, sys, structlog
        def keep(logger, method, event_dict):
            print(json.dumps(event_dict["event"]), file=sys.stdout)
            raise structlog.DropEvent
        structlog.configure(processors=[keep])
        """
    )
    assert '"aiodetach.detached"' in done.stdout.splitlines()
    assert "aiodetach." not in done.stderr
