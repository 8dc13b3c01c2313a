"""The installed distribution's version, in a module of its own so that the
CLI and the OpenTelemetry hook can name it without importing the package face."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("aiodetach")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
