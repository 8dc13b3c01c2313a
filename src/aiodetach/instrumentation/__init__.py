"""Hooks into every step of a detach: for dashboards, traces and progress lines.

A *hook* is any callable taking one record ([`Record`][aiodetach.instrumentation.Record]):

- `DetachRecord`: a step of one ``detach()`` call (``started``,
  ``persistent_detached``, ``unplug_started`` / ``unplug_joined``,
  ``finished`` with its [`DetachResult`][aiodetach.DetachResult] or error);
- `UnplugRecord`: a step of a device's live unplug, shared by every
  caller joined to it (``request_sent``, ``attempt_timed_out``, ``removed``
  by event or by XML, ``ended``, …);
- `ConnectionRecord`: the libvirt connection (``lost``,
  ``reconnected``, …).

Give hooks to ``DetachService(..., hooks=[...])`` or
``DetachFleet(..., hooks=[...])``:

```python
from aiodetach.instrumentation import otel_hook, prometheus_hook

async with DetachService(hooks=[prometheus_hook(), otel_hook()]) as svc:
    ...
```

Hooks are called synchronously on the event loop thread, at each state
change of a detach, never per libvirt event lookup and never from a worker
thread.  A hook that raises is logged (``aiodetach.hook_failed``, once per
hook and step) and otherwise ignored: it never changes an outcome.  The
library's logging is the default hook (`log_hook`, same event
names as ever); ``log=False`` leaves it out.

`prometheus_hook()` needs ``pip install 'aiodetach[prometheus]'``,
`otel_hook()` ``pip install 'aiodetach[otel]'``; ``aiodetach`` itself
imports neither.
"""

from __future__ import annotations

from ._logging import log_hook
from ._otel import otel_hook
from ._prometheus import prometheus_hook
from ._records import (
    ConnectionRecord,
    ConnectionStep,
    DetachRecord,
    DetachStep,
    Hook,
    Outcome,
    Record,
    UnplugOutcome,
    UnplugRecord,
    UnplugStep,
    outcome_of,
)

__all__ = [
    "ConnectionRecord",
    "ConnectionStep",
    "DetachRecord",
    "DetachStep",
    "Hook",
    "Outcome",
    "Record",
    "UnplugOutcome",
    "UnplugRecord",
    "UnplugStep",
    "log_hook",
    "otel_hook",
    "outcome_of",
    "prometheus_hook",
]
