"""The journal's take-up at ``open()``: what an earlier run of this process left pending.

Every unplug the journal holds unfinished for the service's URI is
reconciled with the live XML: gone → reported detached
(``confirmed_by="xml"``); still attached → taken up by the registry (in
``pending()``, joined by a ``detach()`` of it), with no request sent before
its last request's window is over; domain gone, shut off or re-started since
→ the request died with it.  Nothing is ever sent from here: a maybe-sent
request is always waited out first.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from ._connection import Connection
from ._errors_map import is_domain_gone, is_not_running
from ._journal import Entry, Journal
from ._log import get_log
from ._registry import Unplugs
from ._result import Recovered
from ._unplug import Unplug, Verdict, retrieve
from ._xml import DeviceRef, Selector, find_device
from .backend import BackendError

_log = get_log()

__all__ = ["fingerprint", "take_up"]


def fingerprint(device: DeviceRef) -> str:
    """What the journal records to know the device again after a restart: its
    description, and its identity where it has one (a hostdev's source
    address, an interface's MAC…), so that another device attached under the
    same alias meanwhile is not taken for it.  Identifiers only, never XML."""
    if device.identity is None:
        return device.description
    return f"{device.description} {device.identity_alone!r}"


async def take_up(
    uri: str,
    conn: Connection,
    unplugs: Unplugs,
    journal: Journal,
    recovered: list[Recovered],
) -> None:
    """Reconcile the journal's unfinished unplugs of ``uri`` with the live XML;
    what was found is appended to ``recovered`` as it is found."""
    entries = await journal.call(journal.unfinished, uri)
    by_domain: dict[str, list[Entry]] = {}
    for entry in entries:
        by_domain.setdefault(entry.domain_uuid, []).append(entry)
    found: list[Unplug] = []
    for uuid, rows in by_domain.items():
        try:
            info = await conn.lookup(uuid)
            xml = await conn.definition(uuid, inactive=False)
        except BackendError as err:
            if is_domain_gone(err):
                await _ended_while_down(journal, rows, "undefined", recovered)
                continue
            if is_not_running(err):
                await _ended_while_down(journal, rows, "shut off", recovered)
                continue
            # Nothing known now (a transient error): taken up all the same,
            # unchecked, so that no request of this run goes into its window;
            # the re-check at the window's end finds how it stands.
            _log.warning(
                "aiodetach.journal_entry_unchecked",
                domain=rows[0].domain_name,
                error=err.message,
            )
            for entry in rows:
                if (entry.domain_uuid, entry.alias) in unplugs.by_key:
                    continue
                found.append(unplugs.take_up(entry, entry.run_id))
                _note(recovered, entry, "pending", entry.domain_name)
            continue
        if not info.state.is_active:
            await _ended_while_down(journal, rows, "shut off", recovered)
            continue
        for entry in rows:
            if entry.run_id is not None and info.run_id not in (None, entry.run_id):
                await _ended_while_down(journal, [entry], "restarted", recovered)
                continue
            live = find_device(xml, Selector("alias", entry.alias))
            if (entry.domain_uuid, entry.alias) in unplugs.by_key:
                continue
            # Gone, or the alias names another device now (the one asked
            # for left, and something else was attached under its alias).
            gone = live is None or (entry.device is not None and fingerprint(live) != entry.device)
            unplug = unplugs.take_up(entry, info.run_id, None if gone else live)
            if gone:
                unplug.decide(Verdict.GONE)
            found.append(unplug)
            _note(recovered, entry, "removed" if gone else "pending", info.name)
    # The ones decided end at their first step: open() returns without them pending.
    decided = [u.follow() for u in found if u.verdict is not None and not u.over]
    if decided:
        await asyncio.wait(decided)  # never cancels them
        for future in decided:
            retrieve(future)


async def _ended_while_down(
    journal: Journal, rows: list[Entry], reason: str, recovered: list[Recovered]
) -> None:
    for entry in rows:
        await journal.call(journal.finish, entry.row, "stopped")
        _note(recovered, entry, "stopped", entry.domain_name, reason=reason)


def _note(
    recovered: list[Recovered],
    entry: Entry,
    outcome: Literal["pending", "removed", "stopped"],
    name: str,
    *,
    reason: str | None = None,
) -> None:
    """What open() found of one journal row, for ``recovered()`` and the log."""
    recovered.append(
        Recovered(
            domain_uuid=entry.domain_uuid,
            domain_name=name,
            alias=entry.alias,
            device=entry.device,
            outcome=outcome,
            confirmed_by="xml" if outcome == "removed" else None,
            reason=reason,
            sent=entry.sent,
            sent_at=entry.sent_at,
        )
    )
    _log.info("aiodetach.recovered", domain=name, alias=entry.alias, outcome=outcome, reason=reason)
