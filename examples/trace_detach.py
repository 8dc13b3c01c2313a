"""Detach one device with the OpenTelemetry and Prometheus hooks, and print
the span and the metrics it produced (needs ``aiodetach[prometheus,otel]``
and ``opentelemetry-sdk``).

python examples/trace_detach.py vm-1 ua-disk1 [qemu:///system] [--attempts N --timeout S]
"""

from __future__ import annotations

import argparse
import asyncio

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DetachError
from aiodetach.instrumentation import otel_hook, prometheus_hook


def show(span: ReadableSpan) -> None:
    """The span as an indented summary: attributes, then each event's offset."""
    start = span.start_time or 0
    status = span.status.status_code.name
    description = f' "{span.status.description}"' if span.status.description else ""
    parent = f"  parent={span.parent.span_id:016x}" if span.parent else ""
    print(f"span {span.name}{parent}  status={status}{description}")
    attrs = " ".join(f"{k}={_text(v)}" for k, v in sorted((span.attributes or {}).items()))
    print(f"  attributes: {attrs}")
    for event in span.events:
        offset = (event.timestamp - start) / 1e9
        shown = " ".join(
            f"{k}={_text(v)}"
            for k, v in (event.attributes or {}).items()
            if k not in ("exception.stacktrace", "exception.message")
        )
        print(f"  +{offset:.3f} s {event.name:<36} {shown}".rstrip())


def _text(value: object) -> str:
    return str(value)


async def main(args: argparse.Namespace) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    hooks = [otel_hook(provider), prometheus_hook(registry)]
    settings = DetachSettings(attempts=args.attempts, timeout=args.timeout)
    async with DetachService(args.uri, settings=settings, hooks=hooks, log=False) as svc:
        try:
            await svc.detach(args.domain, alias=args.alias)
        except DetachError as exc:
            print(f"{type(exc).__name__}: {exc}\n")
    for span in exporter.get_finished_spans():
        show(span)
    print()
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("aiodetach_") and "_bucket" not in line and "_created" not in line:
            print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("domain")
    parser.add_argument("alias")
    parser.add_argument("uri", nargs="?", default="qemu:///system")
    parser.add_argument("--attempts", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=20.0)
    asyncio.run(main(parser.parse_args()))
