"""aiodetach's hypervisor lab: everything the demo, the real-libvirtd tests and
the benchmarks need, and nothing a user of aiodetach needs.

A development package of the aiodetach repository (``lab/``), installed by
``scripts/bootstrap.sh`` into the development virtualenv and never part of
aiodetach's wheel:

- :mod:`aiodetach_lab.domains`: the system libvirtd (started when none
  answers) and throwaway OS-less QEMU domains;
- :mod:`aiodetach_lab.guest`: a tiny bootable Linux guest (kernel + busybox
  initramfs built from Debian packages) and its domain XML;
- :mod:`aiodetach_lab.daemon`: a private libvirtd that a test may kill and
  restart, over its UNIX socket or TCP;
- :mod:`aiodetach_lab.netns`: private libvirtds in network namespaces, a
  "fleet of hosts" that can be partitioned;
- :mod:`aiodetach_lab.requests`: a record of every live detach request that
  reaches libvirt;
- :mod:`aiodetach_lab.bench`: the benchmarks' domains;
- :mod:`aiodetach_lab.demo`: the demo (``aiodetach-lab demo``).
"""

from __future__ import annotations

__all__: list[str] = []
