"""How much memory this agent may use, and what the kernel did about it.

A Raspberry Pi runs the agent under systemd's ``MemoryMax`` (cgroup v2), a container under its
own limit (often cgroup v1): physical memory alone overstates what the worker may take, and
``auto`` settings sized from it would choose a path that the OOM killer then ends. Every reader
takes its files as parameters, so tests point them at a fake tree.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
UNLIMITED_ABOVE = 2**60
"""cgroup v1 writes 'no limit' as a huge page-aligned number (9223372036854771712)."""
GIB = 2**30


@dataclass(frozen=True)
class MemoryLimit:
    """The memory limit that applies to this process, and where it comes from."""

    bytes: int
    source: str
    """``cgroup v1 <folder>``, ``cgroup v2 <folder>`` or ``physical memory``."""
    cgroup: Path | None = None
    """The memory cgroup's folder, where its counters (OOM kills) are read."""
    version: int = 0
    """1 or 2 for a cgroup, 0 for physical memory."""

    def describe(self) -> str:
        """Return the limit for a log line: ``4.0 GiB (cgroup v2 /sys/fs/cgroup/...)``."""
        return f"{self.bytes / GIB:.1f} GiB ({self.source})"

    def oom_kills(self) -> int | None:
        """Return how many processes the kernel's OOM killer ended in this cgroup, if it says.

        cgroup v1 counts them in ``memory.oom_control`` and v2 in ``memory.events`` (both as an
        ``oom_kill N`` line); None where neither exists or the line is missing (older kernels).
        """
        if self.cgroup is None:
            return None
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        return _keyed_value(self.cgroup / name, "oom_kill")


def physical_memory_bytes() -> int:
    """Return the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(
    proc_cgroup: Path = PROC_SELF_CGROUP,
    root: Path = CGROUP_ROOT,
    physical: int | None = None,
) -> MemoryLimit:
    """Return the tightest memory limit on this process: its cgroup's, else physical memory.

    Args:
        proc_cgroup: ``/proc/self/cgroup`` (or another process's).
        root: Where the cgroup file systems are mounted.
        physical: Physical memory in bytes; read from the system when None.

    Returns:
        The limit and its source. A cgroup limit above physical memory counts as none.
    """
    physical = physical_memory_bytes() if physical is None else physical
    limit = MemoryLimit(physical, "physical memory")
    for found in (_cgroup_v1_limit(proc_cgroup, root), _cgroup_v2_limit(proc_cgroup, root)):
        if found is not None and found.bytes < limit.bytes:
            limit = found
    return limit


def _cgroup_paths(proc_cgroup: Path) -> list[tuple[str, str]]:
    """Return (controllers, path) of each line of ``/proc/<pid>/cgroup``."""
    try:
        text = proc_cgroup.read_text(encoding="utf-8")
    except OSError:
        return []
    paths = []
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        paths.append((controllers, path))
    return paths


def _existing(candidates: list[Path], name: str) -> Path | None:
    """Return the first folder that holds the file ``name``."""
    return next((folder for folder in candidates if (folder / name).is_file()), None)


def _cgroup_v1_limit(proc_cgroup: Path, root: Path) -> MemoryLimit | None:
    path = next(
        (
            path
            for controllers, path in _cgroup_paths(proc_cgroup)
            if "memory" in controllers.split(",")
        ),
        None,
    )
    if path is None:
        return None
    mount = root / "memory"
    # Inside a cgroup namespace the path can be relative to a mount that is already the cgroup.
    folder = _existing([mount / path.lstrip("/"), mount], "memory.limit_in_bytes")
    if folder is None:
        return None
    # hierarchical_memory_limit is the tightest limit of the cgroup and all its parents.
    value = _keyed_value(folder / "memory.stat", "hierarchical_memory_limit")
    if value is None:
        value = _number(folder / "memory.limit_in_bytes")
    if value is None or value >= UNLIMITED_ABOVE:
        return None
    return MemoryLimit(value, f"cgroup v1 {folder}", folder, 1)


def _cgroup_v2_limit(proc_cgroup: Path, root: Path) -> MemoryLimit | None:
    path = next((path for controllers, path in _cgroup_paths(proc_cgroup) if not controllers), None)
    if path is None:
        return None
    relative = path.lstrip("/")
    # Unified at the root (Debian 12 and later, Raspberry Pi OS), or beside v1 (hybrid).
    mounts = [
        mount for mount in (root, root / "unified") if (mount / "cgroup.controllers").is_file()
    ]
    if not mounts:
        return None
    own = mounts[0] / relative
    if not own.is_dir():
        own = mounts[0]
    tightest: MemoryLimit | None = None
    folder = own
    while True:
        value = _number(folder / "memory.max")
        if value is not None and (tightest is None or value < tightest.bytes):
            tightest = MemoryLimit(value, f"cgroup v2 {folder}", own, 2)
        if folder == mounts[0] or folder.parent == folder:
            break
        folder = folder.parent
    return tightest


def _number(path: Path) -> int | None:
    """Return the integer a cgroup file holds; None for ``max``, a missing file or junk."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _keyed_value(path: Path, key: str) -> int | None:
    """Return the value of a ``key value`` line in a cgroup file."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def peak_rss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Return a process's peak resident memory (``VmHWM``), or None once it is gone."""
    kib = _status_kib(proc / str(pid) / "status", "VmHWM:")
    return None if kib is None else kib * 1024


def _status_kib(path: Path, key: str) -> int | None:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(key):
            return int(line.split()[1])
    return None


def return_free_memory() -> None:
    """Hand memory the process has freed back to the kernel (glibc's ``malloc_trim``).

    glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB each) for reuse, so
    a generation's activations would stay in the worker's anonymous memory between jobs: 0.4 GiB
    for SDXL at 512x512, which under a 7 GiB limit is what pushes the UNet's file-backed weights
    out. Where the C library has no ``malloc_trim`` (musl), nothing happens.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the size from which allocations are mapped."""
LARGE_ALLOCATION_BYTES = 1 << 20


def return_large_allocations() -> None:
    """Have every allocation of 1 MiB or more mapped on its own, so freeing it returns it.

    glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, and a
    block under the threshold comes from an arena, where a freed picture's 64 MiB stayed
    resident in the daemon after the picture was long gone (``malloc_trim`` did not get it back
    from a worker thread's arena). A fixed threshold keeps the daemon's picture buffers mapped:
    the daemon allocates few large blocks, so the cost is nil. Where the C library has no
    ``mallopt`` (musl), nothing happens.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES)
