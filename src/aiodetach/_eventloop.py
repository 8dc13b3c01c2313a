"""libvirt's event loop on asyncio, safe to use from worker threads and from
several event loops one after another.

libvirt needs an event-loop implementation for events, keepalive and close
notifications; `libvirtaio` (shipped with libvirt-python) provides one
on asyncio.  Used as is it has two properties that break a service like ours:

* **It is not thread-safe.**  libvirt invokes the add/update/remove hooks from
  whatever thread is calling into libvirt.  Blocking calls must run in worker
  threads (``detachDeviceFlags`` can block for 5 s), so the hooks get called
  off the loop thread, where ``loop.add_reader``/``create_task`` are unsafe:
  asyncio's debug mode raises, and in normal mode a handle change made off
  thread may not wake the selector (an event was seen to lag 3 s).
* **It binds to one loop per process, once.**  ``virEventRegisterImpl`` may
  only be called once, so after that loop closes (``asyncio.run`` returning,
  pytest-asyncio's per-test loops) no event is ever delivered again.

`_ThreadSafeImpl` is a small subclass that fixes both without touching
how libvirtaio dispatches: every hook call made off the loop thread is queued,
in order, and applied on the loop thread (woken with ``call_soon_threadsafe``);
handle/timer ids are our own, so a hook can return its id at once.  When a
new loop wants the implementation and the previous loop is no longer running,
the watches and timers still alive are moved onto the new loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import libvirt
import libvirtaio

from ._eventloop_host import HostAsyncIO, HostThread, find_registered
from ._log import LOGGER_NAME, get_log
from .errors import EventLoopConflict

__all__ = ["install_event_loop", "quiet_connection"]

_log = get_log()
_registry_lock = threading.Lock()
_impl: _ThreadSafeImpl | None = None
_host: HostAsyncIO | HostThread | None = None


class _ThreadSafeImpl(libvirtaio.virEventAsyncIOImpl):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        # libvirtaio names its logger after the class: keep its debug lines in
        # the library's own hierarchy, which the host's configuration governs.
        self.log = logging.getLogger(f"{LOGGER_NAME}.libvirtaio")
        self._thread_id = threading.get_ident()
        self._ids = itertools.count(1)
        self._to_libvirtaio: dict[int, int] = {}
        self._alive: set[int] = set()
        self._ops: deque[Callable[[], None]] = deque()
        # Reentrant: a thread holding it can run a finalizer at any bytecode
        # (Python >= 3.12 runs the cyclic GC at the eval loop's checks), and a
        # libvirt object's __del__ (virDomain, virConnect) calls these hooks
        # again on the same thread.  With a plain lock that thread waits on
        # itself for ever (seen on 3.13: a worker thread stuck in _submit).
        self._ops_lock = threading.RLock()
        self._ff_inflight = 0

    # -- ordering machinery ------------------------------------------------
    def _direct_ok(self) -> bool:
        return threading.get_ident() == self._thread_id and not self.loop.is_closed()

    def _submit(self, op: Callable[[], None]) -> None:
        if self._direct_ok():
            self.flush()
            self._apply(op)
            return
        with self._ops_lock:
            self._ops.append(op)
            first = len(self._ops) == 1
        if first:
            # Loop closed: the op waits in the queue for the next bind().
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        """Apply queued hook calls, in order (loop thread only).

        Each call is applied on its own: one that fails (an add for a file
        descriptor that was closed before the loop got to it, as a connect
        failing in its worker thread leaves behind) is logged and skipped,
        and every call queued after it is still applied.  A failure must not
        strand the next connection's watches and keepalive timer.
        """
        while True:
            with self._ops_lock:
                if not self._ops:
                    return
                op = self._ops.popleft()
            self._apply(op)

    @staticmethod
    def _apply(op: Callable[[], None]) -> None:
        try:
            op()
        except Exception as exc:  # isolate one hook call; see flush()
            _log.warning(
                "aiodetach.event_hook_failed",
                hook=getattr(op, "__qualname__", repr(op)),
                error=f"{type(exc).__name__}: {exc}",
            )

    def _forget_failed_add(self, fd: int) -> None:
        """Undo what libvirtaio recorded for an add that raised.

        libvirtaio registers the callback before it asks the loop to watch the
        fd, so an add that raised (EBADF) leaves a callback behind on a dead fd
        number.  The next connection is likely to get that number again, and
        its events would then also be dispatched to the dead callback.
        """
        known = set(self._to_libvirtaio.values())
        descriptor = dict.get(self.descriptors, fd)
        if descriptor is None:
            return
        for iden in list(descriptor.callbacks):
            if iden not in known:
                descriptor.callbacks.pop(iden, None)
                self.callbacks.pop(iden, None)
        if not descriptor.callbacks:
            dict.pop(self.descriptors, fd, None)
            for remove in (self.loop.remove_reader, self.loop.remove_writer):
                with contextlib.suppress(RuntimeError, ValueError, OSError):
                    remove(fd)

    # -- libvirt hooks -----------------------------------------------------
    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        hid = next(self._ids)
        self._alive.add(hid)
        base = super()._add_handle

        def relay(_inner: int, fd_: int, events: int, opaque_: Any) -> None:
            # A dispatch already queued on the loop when libvirt removed the
            # watch from another thread must not reach libvirt any more.
            if hid in self._alive:
                cb(hid, fd_, events, opaque_)  # libvirt knows our id, not libvirtaio's

        def op() -> None:
            try:
                self._to_libvirtaio[hid] = base(fd, event, relay, opaque)
            except Exception:
                self._forget_failed_add(fd)
                raise

        self._submit(op)
        return hid

    def _update_handle(self, watch: int, event: int) -> None:
        base = super()._update_handle

        def op() -> None:
            if watch in self._to_libvirtaio:
                base(self._to_libvirtaio[watch], event)

        self._submit(op)

    def _remove_handle(self, watch: int) -> int:
        if watch not in self._alive:
            return -1
        self._alive.discard(watch)
        base = super()._remove_handle

        def op() -> None:
            inner = self._to_libvirtaio.pop(watch, None)
            if inner is not None:
                base(inner)

        self._submit(op)
        return 0

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        tid = next(self._ids)
        self._alive.add(tid)
        base = super()._add_timeout

        def relay(_inner: int, opaque_: Any) -> None:
            if tid in self._alive:  # as for watches: never after its removal
                cb(tid, opaque_)

        def op() -> None:
            self._to_libvirtaio[tid] = base(timeout, relay, opaque)

        self._submit(op)
        return tid

    def _update_timeout(self, timer: int, timeout: int) -> None:
        base = super()._update_timeout

        def op() -> None:
            if timer in self._to_libvirtaio:
                base(self._to_libvirtaio[timer], timeout)

        self._submit(op)

    def _remove_timeout(self, timer: int) -> int:
        if timer not in self._alive:
            return -1
        self._alive.discard(timer)
        base = super()._remove_timeout

        def op() -> None:
            inner = self._to_libvirtaio.pop(timer, None)
            if inner is not None:
                base(inner)

        self._submit(op)
        return 0

    def schedule_ff_callback(self, iden: int, opaque: Any) -> None:
        self._ff_inflight += 1
        super().schedule_ff_callback(iden, opaque)

    async def _ff_callback(self, iden: int, opaque: Any) -> None:
        try:
            await super()._ff_callback(iden, opaque)
        finally:
            self._ff_inflight -= 1

    # -- loop management ---------------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``loop`` (running in this thread) the one libvirt's events run on."""
        if loop is self.loop:
            self._thread_id = threading.get_ident()
            self.flush()
            return
        old = self.loop
        if not old.is_closed() and old.is_running():
            raise EventLoopConflict(
                "libvirt events are bound to an event loop that is still running in another "
                "thread; aiodetach supports one loop at a time (one after another is fine)"
            )
        # Stop the previous loop watching anything (harmless if it is closed).
        if not old.is_closed():
            for descriptor in list(self.descriptors.values()):
                for remove in (old.remove_reader, old.remove_writer):
                    with contextlib.suppress(RuntimeError, ValueError, OSError):
                        remove(descriptor.fd)
        self.loop = loop
        self._thread_id = threading.get_ident()
        # ff callbacks scheduled on a dead loop never ran: forget them, before
        # the flush below schedules those of the queued removals on this loop
        # (forgotten too, they would take the count below zero when they run).
        self._pending = len(self.callbacks)
        self._ff_inflight = 0
        self._finished = None
        # Apply what libvirt asked for while no loop ran *before* moving the
        # watches: a connection closed after its loop ended queued removals of
        # fds that are closed now, and re-watching those would raise EBADF.
        self.flush()
        for descriptor in list(self.descriptors.values()):
            self._apply(descriptor.update)
        # The previous loop's timer tasks die with it: start them again here.
        for callback in list(self.callbacks.values()):
            if isinstance(callback, libvirtaio.TimeoutCallback):
                task = callback._task
                if task is not None and task.get_loop() is loop:
                    continue  # added by the flush above: already on this loop
                callback._task = None
                if task is not None and not old.is_closed():
                    with contextlib.suppress(RuntimeError):
                        task.cancel()
                if callback.timeout >= 0:
                    self._apply(functools.partial(callback.update, callback.timeout))

    async def ready(self) -> None:
        """Nothing to check: aiodetach's implementation runs on this loop."""

    async def settle(self, max_iterations: int = 100) -> None:
        """Let queued hook calls and free-callbacks run (after a connection closed)."""
        for _ in range(max_iterations):
            self.flush()
            if self._ff_inflight == 0 and not self._ops:
                return
            await asyncio.sleep(0)


class EventBridge(Protocol):
    """What a service needs of libvirt's event implementation, whoever registered it."""

    async def ready(self) -> None: ...

    async def settle(self, max_iterations: int = 100) -> None: ...


def install_event_loop() -> EventBridge:
    """Have libvirt's events reach the running asyncio loop (idempotent).

    `DetachService` calls it for you.  libvirt takes one event
    implementation per process, so it works with the one already registered:

    * none yet: it registers aiodetach's (libvirtaio's, made thread-safe, and
      moved along when a process runs several loops one after another); call
      it, instead of ``libvirtaio.virEventRegisterAsyncIOImpl()``, before
      opening your own connections if your process uses libvirt too;
    * yours from ``libvirtaio.virEventRegisterAsyncIOImpl()`` on this loop: it
      is kept, and made safe for calls from worker threads (its ``loop``
      attribute is wrapped: see docs/event-loops.md); on another loop:
      `aiodetach.errors.EventLoopConflict`;
    * any other (libvirt's default one, run by a thread of yours): used as it
      is; opening a service checks that something runs it.
    """
    global _impl, _host
    loop = asyncio.get_running_loop()
    with _registry_lock:
        if _impl is not None:
            _impl.bind(loop)
            return _impl
        if _host is None:
            current = libvirtaio.getCurrentImpl()
            if current is None:
                registered, current = find_registered()
                if registered and current is None:
                    _host = HostThread()
            if current is not None:
                _host = HostAsyncIO(current)
        if _host is not None:
            return _host.bind(loop)
        impl = _ThreadSafeImpl(loop)
        try:
            impl.register()
        except RuntimeError as exc:
            raise EventLoopConflict(
                f"another libvirt event implementation is already registered: {exc}"
            ) from None
        libvirtaio._current_impl = impl
        _impl = impl
        return _impl


_ErrorFunc = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_ignore_error = _ErrorFunc(lambda _user_data, _error: None)  # alive for the process


@functools.cache
def _conn_set_error_func() -> Callable[[libvirt.virConnect], None] | None:
    """libvirt's ``virConnSetErrorFunc``, which libvirt-python does not wrap.

    ``None`` where it cannot be reached (no ``libvirt.so.0`` by that name, a
    libvirt-python that stores its pointers differently): errors of aiodetach's
    connections then go to the process's handler, as for any libvirt call.
    """
    try:
        lib = ctypes.CDLL("libvirt.so.0")  # the copy libvirt-python already loaded
        set_func = lib.virConnSetErrorFunc
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    except (OSError, AttributeError):
        return None
    set_func.argtypes = [ctypes.c_void_p, ctypes.c_void_p, _ErrorFunc]
    set_func.restype = None
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    get_pointer.restype = ctypes.c_void_p

    def quiet(conn: libvirt.virConnect) -> None:
        capsule = getattr(conn, "_o", None)
        if type(capsule).__name__ != "PyCapsule":
            return
        try:
            pointer = get_pointer(capsule, b"virConnectPtr")
        except ValueError:  # a capsule of another name: not ours to touch
            return
        if pointer:
            set_func(pointer, None, _ignore_error)

    return quiet


def quiet_connection(conn: libvirt.virConnect) -> libvirt.virConnect:
    """Keep libvirt from printing the errors of ``conn``'s calls to stderr.

    libvirt reports every failed call to an error handler, and with none
    registered its default one prints ``libvirt: <domain> error : <message>``
    to stderr.  A handler registered with ``libvirt.registerErrorHandler`` is
    process-wide: it belongs to the host.  So aiodetach sets a no-op handler
    on each connection *it* opened (``virConnSetErrorFunc``), which libvirt
    uses instead of the process's one for that connection's errors; aiodetach
    raises them as typed errors.  The host's handler keeps seeing everything
    else.  (A connect that fails has no connection yet: libvirt reports it to
    the process's handler; see docs/event-loops.md.)
    """
    quiet = _conn_set_error_func()
    if quiet is not None:
        quiet(conn)
    return conn
