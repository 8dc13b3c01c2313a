"""One libvirt connection: worker threads, bounded calls, reconnect with backoff.

Everything the protocol does to libvirt goes through `Connection`, so
the rules about *when* a call may be made live in one place:

- a blocking call never runs on the event loop: it goes to this connection's
  own worker threads;
- once closing has begun, no call is handed to those threads any more
  (callers get [`ServiceClosed`][aiodetach.errors.ServiceClosed], never an executor's
  ``RuntimeError``);
- reads are bounded by ``max_threads``: ten thousand detaches starting
  together must not queue ten thousand reads whose answers (whole domain
  XMLs) pile up on the loop faster than it parses them (measured: that pile
  was the peak memory).  Live requests are not bounded here: each unplug
  sends at most one at a time;
- a lost connection is re-opened with exponential backoff; the
  `generation` counter tells an unplug that events may have been lost
  in between;
- closing leaves no libvirt connection behind, even one whose ``open`` was
  still running in a worker thread when the close began (it is closed once
  that thread returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from ._closing import by_close
from ._errors_map import is_connection_error
from ._log import get_log
from ._reads import SharedReads
from ._settings import DetachSettings
from ._waits import shielded_within
from ._xml import Definition, parse_definition
from .backend import Backend, BackendError, DomainInfo, ErrorCode, EventSink
from .errors import ConnectionLost, DetachError, ServiceClosed
from .instrumentation._dispatch import Hooks
from .instrumentation._records import ConnectionRecord, ConnectionStep

__all__ = ["Connection"]

_log = get_log()

CLOSE_GRACE = 2.0
"""Seconds a close waits for a stuck libvirt call before leaving it to a helper thread."""


def _guarded(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> Callable[[], _T]:
    """``fn(*args, **kwargs)`` for a worker thread, with any exception but a
    `BackendError` turned into one: a backend's bug (a custom backend
    raising ``OSError``) is that request's error, never the whole batch's."""

    def run() -> _T:
        try:
            return fn(*args, **kwargs)
        except (BackendError, DetachError):  # libvirt's answer, or one of ours (the journal's)
            raise
        except Exception as exc:
            raise BackendError(
                ErrorCode.INTERNAL_ERROR, f"the backend raised {type(exc).__name__}: {exc}"
            ) from exc

    run.__wrapped__ = fn  # type: ignore[attr-defined]  # what is being called, for tests
    return run


def _read_definition(backend: Backend, uuid: str, inactive: bool) -> Definition:
    return parse_definition(backend.domain_xml(uuid, inactive=inactive))


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a dropped call's outcome (no 'exception never retrieved')."""
    if not future.cancelled():
        future.exception()


_T = TypeVar("_T")
State = Literal["new", "open", "closing", "closed"]
Readers = Literal["callers", "unplugs"]
"""Who shares a read: the callers' reads before sending, or the unplugs'
re-checks.  The two are kept apart: they seldom coincide (a re-check comes a
``timeout`` after a request), and apart neither ever waits behind the other's
read (a caller's front is never held up by a re-check's read, and the other
way round)."""


class Connection:
    """The service's libvirt connection and the threads that talk to it."""

    def __init__(
        self,
        backend: Backend,
        settings: DetachSettings,
        *,
        read_only: bool,
        hooks: Hooks | None = None,
    ) -> None:
        self.backend = backend
        self.hooks = hooks if hooks is not None else Hooks(())
        self._settings = settings
        self._sink: EventSink | None = None
        self._read_only = read_only
        self.state: State = "new"
        self.generation = 0
        """Bumped by every re-open: events of the connection before are lost."""
        self.reconnects = 0
        self._executor: ThreadPoolExecutor | None = None
        self._slots = asyncio.Semaphore(settings.max_threads)
        self._up = asyncio.Event()
        self._dead: ConnectionLost | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.Future[Any]] = set()
        self.close_grace = CLOSE_GRACE
        """How long `close()` waits for stuck threads (0 after a failed open)."""
        self.reads = SharedReads()
        """Lookups and definitions shared by the callers asking at the same time."""
        self.on_lost: Callable[[], None] | None = None
        """Called whenever a loss starts a reconnect, whoever noticed it (a
        close callback, a failed call, a failed shared read): the registry
        wakes its parked unplugs here so they wait for the reconnect's verdict
        rather than for the end of their window."""

    @property
    def uri(self) -> str:
        return self.backend.uri

    def record(self, kind: ConnectionStep, reason: str | None = None) -> None:
        """Tell the hooks about a step of the connection (loop thread)."""
        if self.hooks:
            self.hooks.emit(
                ConnectionRecord(
                    kind=kind,
                    uri=self.uri,
                    time=time.monotonic(),
                    reason=reason,
                    reconnects=self.reconnects,
                )
            )

    @property
    def is_up(self) -> bool:
        """Connected now (False while a reconnect is under way)."""
        return self._up.is_set() and self._dead is None

    # ------------------------------------------------------------ life
    async def open(self, sink: EventSink) -> None:
        """Start the worker threads and connect (raises `BackendError`,
        or `ConnectionLost` when the daemon does not answer within
        ``connect_timeout``: a TCP connect to a host behind a partition hangs
        for minutes, and nothing else would end it).

        ``sink`` receives libvirt's notifications, on this connection and on
        every one re-opened after it.
        """
        self._sink = sink
        self._executor = ThreadPoolExecutor(
            max_workers=self._settings.max_threads, thread_name_prefix="aiodetach"
        )
        self.state = "open"
        timeout = self._settings.connect_timeout
        try:
            await self._bounded(self.backend.open, timeout, self._sink, read_only=self._read_only)
        except TimeoutError:
            raise ConnectionLost(
                f"libvirtd at {self.uri} did not answer within {timeout:g} s (connect_timeout)"
            ) from None
        self._up.set()

    def begin_close(self) -> None:
        """From now on no call is handed to the worker threads."""
        if self.state in ("new", "open"):
            self.state = "closing"
        self._up.set()  # whoever waits for a reconnect wakes and finds us closing
        for future in list(self._waiting):  # whoever waits for a thread, too
            future.cancel()

    async def close(self) -> None:
        """Stop reconnecting, disconnect, join the worker threads.

        The backend is closed twice on purpose: once at once (a backend that
        allows it unblocks calls stuck on a dead daemon that way; libvirt's
        waits for its call in flight, see `aiodetach._libvirt`), and once
        more after every worker thread has returned, in case an ``open`` that
        was still running in one of them connected after the first close.

        Neither may hold the close up for long: a connect to a host behind a
        network partition sits in its thread until the kernel gives up on
        it (about two minutes), and no libvirt call interrupts it.  So the
        close waits at most `CLOSE_GRACE` seconds for each step; what
        is still running then is finished by a helper thread of its own
        (which closes the late connection), and logged.
        """
        self.begin_close()
        task = self._reconnect_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.reads.close(self.close_grace)
        executor = self._executor
        if executor is not None:
            deadline = asyncio.get_running_loop().time() + self.close_grace
            await self._off_loop(self.backend.close, "close", deadline)

            def join_then_close() -> None:
                executor.shutdown(wait=True)
                with contextlib.suppress(Exception):
                    self.backend.close()

            await self._off_loop(join_then_close, "join worker threads", deadline)
        self.state = "closed"

    async def _off_loop(self, fn: Callable[[], object], what: str, deadline: float) -> None:
        """Run ``fn`` in a thread of its own; wait for it until ``deadline`` (both
        steps of a close share one CLOSE_GRACE).

        Not the loop's default executor: ``asyncio.run`` joins that one when
        it returns, so a stuck call there would hang the caller's exit.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                fn()
            except Exception:  # noqa: S110 - best effort: the connection is going away
                pass
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone by now
                    loop.call_soon_threadsafe(settle)

        thread = threading.Thread(target=run, name=f"aiodetach-close-{self.uri}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # the interpreter is exiting: 3.12 starts no thread then
            run()  # unbounded, here: the process ends anyway, an unclosed connection not
            return
        try:
            await shielded_within(done, max(deadline - loop.time(), 0.01))
        except TimeoutError:
            _log.warning(
                "aiodetach.close_left_running",
                uri=self.uri,
                step=what,
                grace=CLOSE_GRACE,
                note="a libvirt call is stuck (unreachable host?); it is finished and "
                "its connection closed in the background",
            )
            return
        thread.join(1.0)  # it has only to return

    async def _bounded(self, fn: Callable[..., _T], limit: float, *args: Any, **kwargs: Any) -> _T:
        """`call()`, waiting at most ``limit`` s (TimeoutError); the call
        itself goes on in its thread and its result is dropped."""
        self._check_open()
        async with self._slots:
            executor = self._check_open()
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(executor, _guarded(fn, *args, **kwargs))
            try:
                return await shielded_within(future, limit)
            except TimeoutError:
                future.add_done_callback(_consume)
                raise

    # ----------------------------------------------------------- calls
    def _check_open(self) -> ThreadPoolExecutor:
        if self.state != "open" or self._executor is None:
            raise ServiceClosed(f"service is {self.state}")
        return self._executor

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run one blocking call in a worker thread (at most ``max_threads`` at once).

        A close releases whoever waits here at once (`ServiceClosed`),
        even if the call itself is stuck in its thread (a read on a connection
        into a network partition blocks until keepalive gives up, or longer).
        """
        self._check_open()
        async with self._slots:
            executor = self._check_open()  # closing may have begun while queued
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(executor, _guarded(fn, *args, **kwargs))
            self._waiting.add(future)
            try:
                return await future
            except asyncio.CancelledError as exc:
                if by_close(exc, closing=self.state != "open"):
                    raise ServiceClosed(f"service is {self.state}") from None
                raise
            finally:
                self._waiting.discard(future)

    def submit(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        """Hand a live request to a worker thread (not bounded: see module doc).

        Returns the thread's future itself: the caller shields it, so that a
        request already inside libvirt is always seen through to its answer.
        """
        executor = self._check_open()
        return asyncio.get_running_loop().run_in_executor(executor, _guarded(fn))

    async def read(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """An idempotent call: if the connection drops, wait for it and ask again.

        Never asked of a connection known to be down: it waits for the
        reconnect first (`ConnectionLost` once given up on).  A shared
        read (`aiodetach._reads`) may start long after its callers came,
        behind a read that hung in a partition; by then a reconnect's connect
        may be holding the backend for minutes (a TCP connect into a partition
        sits in SYN retries for ~2 min), and a read sent then would wait for it.
        """
        while True:
            if not self.is_up:
                await self.wait_up()
            try:
                return await self.call(fn, *args, **kwargs)
            except BackendError as err:
                if self.state != "open":
                    raise ServiceClosed(f"service is {self.state}") from None
                if not is_connection_error(err):
                    raise
                self.lost("call failed: " + err.message)
                await self.wait_up()

    def lookup(self, ref: str, *, by: Readers = "callers") -> asyncio.Future[DomainInfo]:
        """The domain named ``ref`` (name or UUID), from a lookup that started
        no earlier than this call, shared with the concurrent calls of the
        same ``by`` (see `aiodetach._reads`)."""
        return self.reads.read((by, "lookup", ref), lambda: self.read(self.backend.lookup, ref))

    def definition(
        self, uuid: str, *, inactive: bool, by: Readers = "callers"
    ) -> asyncio.Future[Definition]:
        """One definition of a domain, read no earlier than this call and parsed
        in the worker thread, both shared with the concurrent calls of ``by``."""
        return self.reads.read(
            (by, "xml", uuid, inactive),
            lambda: self.read(_read_definition, self.backend, uuid, inactive),
        )

    # ------------------------------------------------------- reconnect
    def lost(self, reason: str) -> bool:
        """The connection is gone (close callback or a failed call).

        Returns True if this started a reconnect (the caller then wakes its
        waiters), False if one was already under way or we are closing.
        """
        if self.state != "open" or not self._up.is_set() or self._dead is not None:
            return False
        self.record("lost", reason)
        self._up.clear()
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())
        if self.on_lost is not None:
            self.on_lost()
        return True

    def revive(self) -> None:
        """A new request after the daemon was given up on: try connecting again."""
        if self._dead is None or self.state != "open":
            return
        if self._reconnect_task is not None and not self._reconnect_task.done():
            return
        self._dead = None
        self._up.clear()
        self.record("reconnecting")
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def wait_up(self) -> None:
        """Wait until connected; ConnectionLost if given up on, ServiceClosed if closing."""
        await self._up.wait()
        if self.state != "open":
            raise ServiceClosed(f"service is {self.state}")
        if self._dead is not None:
            raise ConnectionLost(self._dead.message, libvirt_code=self._dead.libvirt_code)

    async def _reconnect(self) -> None:
        """Re-open with backoff until ``reconnect_timeout``.

        Every attempt is bounded by the time left: a connect into a network
        partition hangs in the kernel for minutes, and the callers waiting
        for us must get `ConnectionLost` at the bound they configured.
        An attempt still hanging when time is up is not abandoned: if it
        connects after all, the connection is taken up again (as a
        reconnect), so the next request need not wait for a fresh one.
        """
        loop = asyncio.get_running_loop()
        settings = self._settings
        deadline = loop.time() + settings.reconnect_timeout
        delay = 0.05
        sink = self._sink
        assert sink is not None
        with contextlib.suppress(Exception):
            await self._bounded(self.backend.close, max(deadline - loop.time(), 0.1))
        try:
            while True:
                attempt = self.submit(
                    functools.partial(self.backend.open, sink, read_only=self._read_only)
                )
                try:
                    await shielded_within(attempt, max(deadline - loop.time(), 0.05))
                    break
                except TimeoutError:
                    self._give_up(f"no answer within {settings.reconnect_timeout:g} s", None)
                    # The attempt goes on in its thread; see the docstring.
                    try:
                        await attempt
                    except BackendError:
                        return
                    if self.state != "open":
                        return  # closing: close() closes the late connection
                    break
                except BackendError as err:
                    left = deadline - loop.time()
                    if left <= 0 or err.final:  # final: no retry can help (a caller's
                        self._give_up(err.message, err.code, final=err.final)  # dead one)
                        return
                    # The last try comes at the bound, not a backoff before
                    # it: the daemon is given up on only once it stayed away
                    # for all of ``reconnect_timeout``.
                    await asyncio.sleep(min(delay, left))
                    delay = min(delay * 2, settings.reconnect_backoff_max)
        except ServiceClosed:
            return
        self._dead = None
        self.reconnects += 1
        self.generation += 1
        self._up.set()
        self.record("reconnected")

    def _give_up(self, reason: str, code: int | None, *, final: bool = False) -> None:
        waited = f"did not come back within {self._settings.reconnect_timeout:g} s"
        self._dead = ConnectionLost(
            f"libvirtd at {self.uri} {'is gone for good' if final else waited}: {reason}",
            libvirt_code=code,
        )
        self.record("dead", reason)
        self._up.set()  # wake waiters; they find the connection dead
