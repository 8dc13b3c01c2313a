"""[`BlockingDetachService`][aiodetach.BlockingDetachService]: the service for threaded callers.

Agents that run on native threads (nova and its kin) cannot await.  Rather
than a second implementation of the protocol, the facade runs one ordinary
[`DetachService`][aiodetach.DetachService] on an event loop of its own, in one
background thread, and hands each call to it with
`asyncio.run_coroutine_threadsafe`.  Every promise of the asynchronous
service therefore holds unchanged: the same results, the same exception
objects, and one unplug per device joined by every caller, whichever thread
it came from (they all meet on the one loop).

Why one loop thread for every facade of the process: libvirt's event
implementation is process-wide and bound to one running loop
(docs/event-loops.md), so facades on loops of their own, in threads of their
own, could not both get their events.  The thread starts with the first
facade and ends when the last one closes.

Why a daemon thread plus an exit hook: a facade left open must neither hang
interpreter exit nor be killed mid-close.  The hook is registered with
`threading._register_atexit`, which runs *before* the interpreter joins
non-daemon threads: callers still blocked in a detach in such threads get
[`ServiceClosed`][aiodetach.errors.ServiceClosed] and can end, instead of
holding exit up for the rest of their unplug.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Iterator, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from ._loop_thread import LoopThread as _LoopThread
from ._many import DetachOutcome, DetachRequest
from ._result import DetachResult, Recovered
from ._rules import DomainRef
from ._service import DetachService, DeviceEvent
from ._settings import DetachSettings
from .errors import CalledFromEventLoop, InvalidRequest, ServiceClosed

__all__ = ["BlockingDetachService"]

P = ParamSpec("P")
T = TypeVar("T")

EXIT_CLOSE_TIMEOUT = 30.0
"""Seconds the exit hook waits for a facade left open to close before the
interpreter goes on exiting (its thread is a daemon: it then dies with it)."""


def _with_arguments_of(
    _: Callable[P, object],
) -> Callable[[Callable[..., None]], Callable[Concatenate[BlockingDetachService, P], None]]:
    """Give ``__init__`` the parameters of ``DetachService.__init__``: the
    facade forwards them untouched, so a parameter added there is accepted
    (and type-checked) here without a change."""

    def take(init: Callable[..., None]) -> Callable[Concatenate[BlockingDetachService, P], None]:
        return init

    return take


class BlockingDetachService:
    """A [`DetachService`][aiodetach.DetachService] for code that runs on
    threads, not on asyncio.

    ```python
    with BlockingDetachService("qemu:///system") as svc:  # connects here
        result = svc.detach("vm-1", alias="ua-disk1")     # blocks this thread
    ```

    It takes exactly the arguments of `DetachService` and runs one on an
    event loop in one background thread (one for every facade of the
    process: libvirt's events are bound to one loop).  Any number of threads
    may call it at once: each call blocks its own thread only, returns the
    same [`DetachResult`][aiodetach.DetachResult] and raises the same
    [`DetachError`][aiodetach.errors.DetachError] subclasses (the same objects,
    attributes included; the traceback starts at the caller's line), and two
    threads detaching one device share one unplug (the second joins it:
    `result.joined`).

    Constructing it connects (raising what `DetachService.open()` raises);
    `close()` or leaving the `with` block closes it.  A facade still open at
    interpreter exit is closed by an exit hook that runs before non-daemon
    threads are joined: detaches still pending then raise
    [`ServiceClosed`][aiodetach.errors.ServiceClosed] in their threads, and a
    live unplug already requested goes on in the guest (with a journal, the
    next run takes it up).  Calls after close raise `ServiceClosed`.

    A blocking call from a thread that runs an asyncio event loop is refused
    with [`CalledFromEventLoop`][aiodetach.errors.CalledFromEventLoop]: it
    would stall that loop (and deadlock on the facade's own); use
    `DetachService` there.
    """

    @_with_arguments_of(DetachService)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_in_event_loop("BlockingDetachService()")
        self._lock = threading.Lock()
        self._closing = False
        self._closed: concurrent.futures.Future[None] | None = None
        self._service: DetachService | None = None
        self._runner = _LoopThread.acquire()

        async def open_service() -> DetachService:
            service = DetachService(*args, **kwargs)
            await service.open()
            return service

        try:
            self._service = self._runner.submit(open_service()).result()
        except BaseException:
            self._closing = True
            self._runner.release()
            self._runner.join(None)
            raise
        _open_facades.add(self)
        _register_exit_hook()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Hand ``coro`` to the loop, unless the facade is closing (checked
        under the lock close() takes, so nothing is submitted behind it)."""
        with self._lock:
            if self._closing:
                coro.close()
                raise ServiceClosed("the blocking service is closed")
            return asyncio.run_coroutine_threadsafe(coro, self._runner.loop)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if timeout is not None and (
            not isinstance(timeout, (int, float))
            or isinstance(timeout, bool)
            or not timeout >= 0
            or timeout == float("inf")
        ):
            coro.close()
            raise InvalidRequest(f"timeout must be a finite number of seconds, not {timeout!r}")
        future = self._submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            # Cancelled by the loop's end: only a close does that.
            raise ServiceClosed("the blocking service was closed during the call") from None
        except BaseException as exc:
            if future.done() and not future.cancelled():
                if exc is future.exception():
                    raise  # the call's own outcome (a DetachTimeout is a TimeoutError too)
                return future.result()  # it ended just as the wait gave up: its own outcome
            # The caller gives up (its timeout, a KeyboardInterrupt), as a
            # cancelled awaiting caller does: it leaves its unplug, which
            # follows its own rules (others may be joined to it; a request out
            # is remembered for its window).
            future.cancel()
            if isinstance(exc, TimeoutError):
                raise TimeoutError(
                    f"no result within the caller's timeout of {timeout} s"
                ) from None
            raise

    @property
    def _svc(self) -> DetachService:
        _refuse_in_event_loop("a blocking call")
        return self._opened

    @property
    def _opened(self) -> DetachService:
        """The service, for what does not block (``uri``, ``settings``,
        ``recovered()``): readable from any thread, an event loop's too."""
        service = self._service
        if service is None:  # pragma: no cover - the constructor raised
            raise ServiceClosed("the blocking service is closed")
        return service

    # ------------------------------------------------------------------ life
    def __enter__(self) -> BlockingDetachService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, timeout: float | None = None) -> None:
        """Close the service; idempotent, from any thread but an event loop's.

        What is in flight ends as `DetachService.aclose()` ends it: callers
        still waiting get [`ServiceClosed`][aiodetach.errors.ServiceClosed];
        live unplugs already requested go on in their guests.  The loop
        thread ends with the last facade of the process.  ``timeout`` bounds
        the wait (``None``: until closed).
        """
        _refuse_in_event_loop("close()")
        with self._lock:
            first = self._closed is None
            if self._closed is None:
                self._closing = True  # from here on nothing is submitted
                self._closed = self._runner.submit(self._aclose())
            closed = self._closed
        if first:
            _open_facades.discard(self)
        try:
            closed.result(timeout)
        except BaseException:
            if first and not closed.done():
                # Out of time: the close goes on in the loop, and lets go of
                # it when it is over.
                closed.add_done_callback(lambda _: self._runner.release())
            elif first:
                self._runner.release()
            raise
        if first:
            self._runner.release()
        self._runner.join(timeout)

    async def _aclose(self) -> None:
        if self._service is not None:
            await self._service.aclose()

    @property
    def closed(self) -> bool:
        """True once `close()` was called (or the exit hook closed it)."""
        return self._closing

    @property
    def uri(self) -> str:
        return self._opened.uri

    @property
    def settings(self) -> DetachSettings:
        return self._opened.settings

    # ---------------------------------------------------------------- API
    def detach(
        self,
        domain: DomainRef,
        *,
        alias: str | None = None,
        target: str | None = None,
        mac: str | None = None,
        xml: str | None = None,
        live: bool | None = None,
        persistent: bool | None = None,
        timeout: float | None = None,
    ) -> DetachResult:
        """`DetachService.detach()`, blocking this thread until it returns.

        ``timeout`` is this caller's own deadline in seconds: when it passes,
        the call raises the built-in `TimeoutError` and the caller leaves, as
        an awaiting caller cancelled by `asyncio.timeout` does.  The unplug
        is not stopped: it follows its rules (other callers may still be
        joined; a request already out is never re-sent because of it, and
        asking again joins it).  It is not
        [`DetachTimeout`][aiodetach.errors.DetachTimeout], which says the
        *guest* did not release the device.
        """
        return self._call(
            self._svc.detach(
                domain,
                alias=alias,
                target=target,
                mac=mac,
                xml=xml,
                live=live,
                persistent=persistent,
            ),
            timeout,
        )

    def detach_many(
        self,
        requests: Iterable[DetachRequest | Mapping[str, Any]],
        *,
        concurrency: int = 16,
        per_domain: int | None = 4,
        on_progress: Callable[[DetachOutcome, int, int], None] | None = None,
        timeout: float | None = None,
    ) -> list[DetachOutcome]:
        """`DetachService.detach_many()`, blocking.

        ``on_progress`` is called in the facade's thread (keep it short and
        thread-safe).  ``timeout`` as for `detach()`: the batch is cancelled
        (what runs is cancelled and awaited) and `TimeoutError` raised.
        """
        requests = list(requests)  # consumed here, in the caller's thread
        return self._call(
            self._svc.detach_many(
                requests,
                concurrency=concurrency,
                per_domain=per_domain,
                on_progress=on_progress,
            ),
            timeout,
        )

    def events(self, domain: DomainRef | None = None) -> Iterator[DeviceEvent]:
        """`DetachService.events()` as a blocking iterator; it ends when the
        service closes.  Close it (``iterator.close()``) to stop early.

        It watches from its first ``next()`` on (as the async one watches
        from its first ``anext()``): events before that are not seen."""
        stream = self._svc.events(domain)

        async def next_event() -> DeviceEvent:
            return await anext(stream)

        async def close_stream() -> None:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()

        if self._closing:
            raise ServiceClosed("the blocking service is closed")
        try:
            while True:
                try:
                    event = self._call(next_event(), None)
                except (StopAsyncIteration, ServiceClosed):
                    return  # the service closed: the stream ends, as the async one does
                yield event
        finally:
            self._end_stream(close_stream())

    def _end_stream(self, close_stream: Coroutine[Any, Any, None]) -> None:
        """Close an `events()` stream on the loop; wait for it only where
        waiting is allowed.  An iterator left unclosed in a reference cycle
        is finalized by the garbage collector in whatever thread it runs,
        the facade's loop thread included: waiting there for the loop would
        deadlock it, so there the close is only handed over."""
        try:
            closed = self._submit(close_stream)
        except ServiceClosed:
            return
        if _running_loop() is not None:
            return
        with contextlib.suppress(ServiceClosed, concurrent.futures.CancelledError):
            closed.result()

    def pending(self) -> list[tuple[str, str]]:
        """`DetachService.pending()`, read on the service's loop."""
        service = self._svc

        async def read() -> list[tuple[str, str]]:
            return service.pending()

        return self._call(read(), None)

    def recovered(self) -> list[Recovered]:
        """`DetachService.recovered()`: what the journal held at open."""
        return self._opened.recovered()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _refuse_in_event_loop(what: str) -> None:
    if _running_loop() is None:
        return
    raise CalledFromEventLoop(
        f"{what} blocks its thread, and this thread runs an asyncio event loop "
        "(it would stall, or deadlock on the service's own loop): "
        "use aiodetach.DetachService and await it there"
    )


# ------------------------------------------------------------ interpreter exit
_open_facades: set[BlockingDetachService] = set()
"""Every facade not closed yet, held strongly: one its caller dropped without
closing still runs its service on the loop thread, and must be closed at exit
(its connections, its journal) as one still referenced is."""
_exit_hook_registered = False
_exit_hook_lock = threading.Lock()


def _close_open_facades() -> None:
    """Close every facade still open, each bounded by ``EXIT_CLOSE_TIMEOUT``."""
    for facade in list(_open_facades):
        # Nothing may stop the interpreter's exit: a close that fails or runs
        # out of time leaves its daemon thread to die with the process.
        with contextlib.suppress(Exception):
            facade.close(timeout=EXIT_CLOSE_TIMEOUT)


def _register_exit_hook() -> None:
    global _exit_hook_registered
    with _exit_hook_lock:
        if _exit_hook_registered:
            return
        register = getattr(threading, "_register_atexit", None)
        if register is None:  # pragma: no cover - every supported CPython has it
            import atexit

            atexit.register(_close_open_facades)
        else:
            register(_close_open_facades)
        _exit_hook_registered = True
