"""Working with a libvirt event implementation the host registered first.

libvirt takes one event implementation per process, for good: an agent that
called ``libvirtaio.virEventRegisterAsyncIOImpl()``, or runs libvirt's
default implementation in a thread of its own, keeps it, and aiodetach uses
it instead of registering its own.

* **The host's libvirtaio, on the service's loop.**  libvirtaio is not
  thread-safe: libvirt calls its hooks from whatever thread calls into
  libvirt, and aiodetach's blocking calls run in worker threads.  The hooks
  libvirt holds are bound methods of the host's instance, so they cannot be
  swapped; but everything in them that touches asyncio goes through the
  instance's ``loop`` attribute (``add_reader``/``remove_reader``,
  ``add_writer``/``remove_writer``, and ``create_task`` through
  ``asyncio.ensure_future(…, loop=…)``).  `LoopGuard` replaces that one
  attribute: it passes everything through to the loop, and applies those five
  calls on the loop thread, in the order they were made, when they come from
  another thread.  libvirtaio's own bookkeeping (plain dicts) stays where it
  ran.
* **Another implementation, run by a host thread** (libvirt's default one,
  ``virEventRunDefaultImpl()`` in a loop): it is thread-safe; libvirt's
  callbacks then run on that thread, and the service hands each to its loop
  with ``call_soon_threadsafe`` (``_intake``).  Opening a service checks that
  something runs it: a libvirt timer must fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import libvirt
import libvirtaio

from ._log import get_log
from ._waits import shielded_within
from .errors import EventLoopConflict

__all__ = ["HostAsyncIO", "HostThread", "LoopGuard", "find_registered"]

# How long a registered implementation may take to run a due timer before
# opening a service says that nothing runs it.
RUNNING_CHECK = 10.0


_log = get_log()

# After this long holding back a timer task created off the loop thread (see
# _LaterTask.start), say so once; it is still held back.
ASKER_SLOW = 1.0


# The coroutine a libvirtaio timer's task runs (the one whose task libvirtaio keeps).
_TIMER = getattr(getattr(libvirtaio.TimeoutCallback, "_timer", None), "__code__", None)


def _inside_libvirtaio(thread_id: int) -> bool:
    """Is that thread running one of libvirtaio's functions right now?"""
    module = vars(libvirtaio)  # a frame's globals: right even when loaded from a .pyc alone
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_globals is module:
            return True
        frame = frame.f_back
    return False


class _LaterTask:
    """What ``create_task`` returns off the loop thread: the task is created
    on the loop thread, and a ``cancel`` meanwhile reaches it there.

    libvirtaio keeps what ``create_task`` returned (``TimeoutCallback._task``)
    only once the call returns in the asking thread.  A task started before
    that can run its timer, whose callback removes the timer: libvirtaio,
    seeing no task yet, cancels nothing, and the removed timer then fires on
    every loop iteration for good.  So a timer's task starts only once the
    asking thread has left libvirtaio: its hooks never wait, so that is soon,
    and one look that finds the thread outside is conclusive.  The looks back
    off from every loop iteration to every 50 ms.  Other tasks (libvirtaio's
    free-callbacks, which nothing keeps) start at once: a closing service
    waits for them (`HostAsyncIO.settle`)."""

    __slots__ = ("_asker", "_cancelled", "_guard", "_held", "_looks", "_since", "_told", "task")

    def __init__(self, guard: LoopGuard, coro: Coroutine[Any, Any, Any]) -> None:
        self._guard = guard
        self._held = _TIMER is not None and getattr(coro, "cr_code", None) is _TIMER
        self._cancelled = False
        self._asker = threading.get_ident()
        self._looks = 0
        self._since = 0.0
        self._told = False
        self.task: asyncio.Task[Any] | None = None

    def start(self, coro: Coroutine[Any, Any, Any]) -> None:
        loop = self._guard.loop
        if self._cancelled:
            coro.close()
            return
        if self._held and _inside_libvirtaio(self._asker):
            self._looks += 1
            if self._looks == 1:
                self._since = loop.time()
            elif not self._told and loop.time() - self._since >= ASKER_SLOW:
                self._told = True
                _log.warning(
                    "aiodetach.libvirtaio_call_slow",
                    thread=self._asker,
                    waited=ASKER_SLOW,
                )
            if self._looks < 20:
                loop.call_soon(self.start, coro)
            else:
                loop.call_later(min(0.05, 0.001 * self._looks), self.start, coro)
            return
        self.task = loop.create_task(coro)

    def cancel(self, msg: Any = None) -> bool:
        def now() -> None:
            self._cancelled = True
            if self.task is not None:
                self.task.cancel(msg)

        self._guard.submit(now)
        return True


class LoopGuard:
    """Stands in for ``impl.loop`` of the host's libvirtaio implementation."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread_id = threading.get_ident()
        self._ops: deque[Callable[[], None]] = deque()
        self._lock = threading.RLock()  # reentrant: see _ThreadSafeImpl

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)

    def __repr__(self) -> str:
        return f"aiodetach LoopGuard({self.loop!r})"

    def submit(self, op: Callable[[], None]) -> None:
        """Run ``op`` now on the loop thread (after what was queued), else queue it."""
        if threading.get_ident() == self.thread_id:
            self.flush()
            op()
            return
        with self._lock:
            self._ops.append(op)
            first = len(self._ops) == 1
        if first:
            with contextlib.suppress(RuntimeError):  # loop closed: nothing to watch
                self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        while True:
            with self._lock:
                if not self._ops:
                    return
                op = self._ops.popleft()
            op()

    def add_reader(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        self.submit(lambda: self.loop.add_reader(fd, callback, *args))

    def add_writer(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        self.submit(lambda: self.loop.add_writer(fd, callback, *args))

    def remove_reader(self, fd: Any) -> bool:
        self.submit(lambda: self._remove(self.loop.remove_reader, fd))
        return True

    def remove_writer(self, fd: Any) -> bool:
        self.submit(lambda: self._remove(self.loop.remove_writer, fd))
        return True

    @staticmethod
    def _remove(remove: Callable[[Any], bool], fd: Any) -> None:
        # Applied late, the fd may have been closed meanwhile: nothing to unwatch.
        with contextlib.suppress(ValueError, OSError):
            remove(fd)

    def create_task(self, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        if threading.get_ident() == self.thread_id:
            self.flush()
            return self.loop.create_task(coro, **kwargs)
        later = _LaterTask(self, coro)
        self.submit(lambda: later.start(coro))
        return later


class HostAsyncIO:
    """The host's libvirtaio implementation, made safe for worker threads."""

    def __init__(self, impl: libvirtaio.virEventAsyncIOImpl) -> None:
        self.impl = impl

    def bind(self, loop: asyncio.AbstractEventLoop) -> HostAsyncIO:
        current = self.impl.loop
        guard = current if isinstance(current, LoopGuard) else None
        host_loop = guard.loop if guard is not None else current
        if host_loop is not loop and host_loop.is_closed():
            raise EventLoopConflict(
                "libvirt's events run on the event loop your application gave "
                "libvirtaio.virEventRegisterAsyncIOImpl(), which has ended: libvirt keeps that "
                "implementation, bound to that loop, for the life of the process, so no later "
                "loop gets libvirt's events; run your services in one asyncio.run, or, to run "
                "loops one after another, call aiodetach.install_event_loop() instead of "
                "libvirtaio's registration (it follows each new loop)"
            )
        if host_loop is not loop:
            where = "is still running" if host_loop.is_running() else "is not running"
            raise EventLoopConflict(
                "libvirt's events run on the event loop your application gave "
                f"libvirtaio.virEventRegisterAsyncIOImpl(), which {where}: open the service "
                "on that loop (asyncio.run_coroutine_threadsafe from other threads), or let "
                "aiodetach register the implementation (aiodetach.install_event_loop() "
                "instead of libvirtaio's), which follows loops one after another"
            )
        if guard is None:
            self.impl.loop = LoopGuard(loop)  # type: ignore[assignment]
        return self

    async def ready(self) -> None:
        """Nothing to check: the implementation runs on this very loop."""

    async def settle(self, max_iterations: int = 100) -> None:
        """Let queued loop calls and libvirtaio's free-callbacks run."""
        guard = self.impl.loop
        for _ in range(max_iterations):
            if isinstance(guard, LoopGuard):
                guard.flush()
            if not self.impl._pending:
                return
            await asyncio.sleep(0)


class HostThread:
    """An implementation that is not libvirtaio (libvirt's default one, run by
    a host thread): used as it is; the service hands callbacks to its loop."""

    def bind(self, loop: asyncio.AbstractEventLoop) -> HostThread:
        return self

    async def ready(self) -> None:
        """Refuse a registered implementation that nothing runs: no event,
        keepalive or close notification would ever arrive."""
        loop = asyncio.get_running_loop()
        fired = loop.create_future()

        def done() -> None:
            if not fired.done():
                fired.set_result(None)

        def tick(timer: int, _opaque: object) -> None:
            with contextlib.suppress(libvirt.libvirtError):
                libvirt.virEventRemoveTimeout(timer)
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(done)

        timer = libvirt.virEventAddTimeout(0, tick, None)
        try:
            await shielded_within(fired, RUNNING_CHECK)
        except TimeoutError:
            with contextlib.suppress(libvirt.libvirtError):
                libvirt.virEventRemoveTimeout(timer)
            raise EventLoopConflict(
                "a libvirt event implementation is registered (libvirt.virEventRegister"
                "DefaultImpl()?) but nothing runs it: run libvirt.virEventRunDefaultImpl() in "
                "a loop in a thread of your application, or do not register one and let "
                f"aiodetach register its own (a due timer did not fire in {RUNNING_CHECK:g} s)"
            ) from None

    async def settle(self, max_iterations: int = 100) -> None:
        """Nothing queued here: the host's thread frees what libvirt closes."""


def find_registered() -> tuple[bool, libvirtaio.virEventAsyncIOImpl | None]:
    """Whether some libvirt event implementation is registered (not by us),
    and the libvirtaio instance it is, if it is one.

    ``virEventAddTimeout`` fails exactly when none is registered.  libvirtaio
    names its instance (``getCurrentImpl()``) only when the host used
    ``virEventRegisterAsyncIOImpl()``; ``virEventAsyncIOImpl(loop=…).register()``
    registers one as surely, unnamed, and taken for an implementation a host
    thread runs it would be called from worker threads unguarded.  So the
    probe timer (disabled: -1) is looked for among the libvirtaio instances
    that exist: one scan of the collector's objects (0.14 s with a million),
    once per process, only when the probe made a libvirtaio callback
    (libvirtaio numbers its callbacks with one class-wide counter, so its ids
    are unique across instances, and the counter shows that it was used).
    """
    ids = getattr(libvirtaio.Callback, "_iden_counter", None)  # None: always look
    before = repr(ids) if ids is not None else None
    try:
        timer = libvirt.virEventAddTimeout(-1, lambda _t, _o: None, None)
    except libvirt.libvirtError:
        return False, None
    owner = None
    if ids is None or repr(ids) != before:  # a libvirtaio callback was made
        owner = next(
            (
                o
                for o in gc.get_objects()
                if isinstance(o, libvirtaio.virEventAsyncIOImpl)
                and isinstance(o.callbacks.get(timer), libvirtaio.TimeoutCallback)
            ),
            None,
        )
    _remove_probe(timer, owner)
    return True, owner


def _remove_probe(timer: int, owner: libvirtaio.virEventAsyncIOImpl | None) -> None:
    """Remove the probe timer where its implementation allows it.

    libvirtaio schedules a removed timer's free-callback on its loop, which
    from another thread asyncio refuses (and libvirt-python prints that to
    stderr): on a loop running elsewhere the removal is handed to it; on a
    closed one the timer stays, disabled, in an implementation that ended
    with its loop.
    """

    def remove() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            libvirt.virEventRemoveTimeout(timer)

    loop = owner.loop if owner is not None else None
    if loop is None:
        remove()
    elif loop.is_closed():
        pass
    elif loop.is_running() and loop is not _running_loop():
        loop.call_soon_threadsafe(remove)
    else:
        remove()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
