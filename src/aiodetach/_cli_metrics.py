"""``--metrics-port``: the command line serves Prometheus metrics while a
command runs (kept apart from `aiodetach._cli`, which stays about commands)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .errors import InvalidRequest
from .instrumentation import Hook

__all__ = ["Metrics"]


class Metrics:
    """``--metrics-port``: Prometheus metrics served over HTTP while a command runs."""

    def __init__(self, args: argparse.Namespace, own: Callable[[Any], Any] | None = None) -> None:
        """``own(registry)`` makes a command's own metrics, before the first scrape
        can come (what it returns is `own`)."""
        self.hooks: list[Hook] = []
        self.registry: Any = None
        self.own: Any = None
        self._make_own = own
        self._server: Any = None
        self._port: int | None = args.metrics_port
        self._addr: str = args.metrics_addr

    def __enter__(self) -> Metrics:
        if self._port is None:
            return self
        try:
            import prometheus_client
        except ImportError:
            raise InvalidRequest(
                "--metrics-port needs prometheus-client: pip install 'aiodetach[prometheus]'"
            ) from None
        from .instrumentation import prometheus_hook

        self.registry = registry = prometheus_client.CollectorRegistry()
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)
        self.hooks.append(prometheus_hook(registry))
        if self._make_own is not None:
            self.own = self._make_own(registry)
        try:
            self._server, _thread = prometheus_client.start_http_server(
                self._port, addr=self._addr, registry=registry
            )
        except OSError as exc:  # a port in use, an address not of this host
            raise InvalidRequest(
                f"--metrics-addr/--metrics-port: cannot serve metrics on "
                f"{self._addr}:{self._port}: {exc.strerror or exc}"
            ) from None
        host, port = self._server.server_address[:2]
        print(f"serving Prometheus metrics on http://{host}:{port}/metrics", file=sys.stderr)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
