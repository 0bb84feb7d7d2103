"""Memory cgroups for tests and benchmarks: run a process tree under a memory limit, as on a Pi.

cgroup v1 (``/sys/fs/cgroup/memory``) or v2 (``memory.max``), a child of the caller's own cgroup,
so the limit nests under whatever already applies. Where neither can be written, :func:`create`
raises :class:`CgroupUnavailableError` with the reason, which tests turn into a skip.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailableError(Exception):
    """No memory cgroup can be made here; the message says why."""


@dataclass
class MemoryCgroup:
    """A memory cgroup this process made, with its limit."""

    path: Path
    version: int

    @property
    def limit_file(self) -> Path:
        return self.path / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")

    def set_limit(self, limit: int) -> None:
        self.limit_file.write_text(f"{limit}\n")

    def wrap(self, command: list[str]) -> list[str]:
        """Return ``command`` started inside this cgroup (it moves itself in, then execs)."""
        procs = shlex.quote(str(self.path / "cgroup.procs"))
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "in-cgroup", *command]

    def stat(self) -> dict[str, int]:
        """Return ``memory.stat`` as numbers (v1: rss, mapped_file, pgmajfault...; v2: anon...)."""
        values = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if value.strip().isdigit():
                values[name] = int(value)
        return values

    def peak(self) -> int | None:
        """Return the cgroup's peak usage (page cache included), where the kernel keeps one."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        with contextlib.suppress(OSError, ValueError):
            return int((self.path / name).read_text())
        return None

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        """Remove the cgroup, killing what still runs in it."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return
            except OSError:
                for pid in (self.path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.1)
            else:
                return


def _own(controller: str) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller and controller in names.split(",")) or (not controller and not names):
            return path
    return None


def create(limit: int, name: str = "edgeai-test") -> MemoryCgroup:
    """Make a memory cgroup below this process's own, limited to ``limit`` bytes.

    Raises:
        CgroupUnavailableError: Neither cgroup v1's memory controller nor a v2 cgroup with
            the memory controller can be written here.
    """
    leaf = f"{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    problems = []
    own = _own("memory")
    if own is not None and (ROOT / "memory").is_dir():
        parent = ROOT / "memory" / own.lstrip("/")
        if not parent.is_dir():
            parent = ROOT / "memory"
        try:
            (parent / leaf).mkdir()
        except OSError as exc:
            problems.append(f"cgroup v1 {parent}: {exc}")
        else:
            cgroup = MemoryCgroup(parent / leaf, 1)
            cgroup.set_limit(limit)
            return cgroup
    own = _own("")
    if own is not None and (ROOT / "cgroup.controllers").is_file():
        parent = ROOT / own.lstrip("/")
        try:
            if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                (parent / "cgroup.subtree_control").write_text("+memory\n")
            (parent / leaf).mkdir()
        except OSError as exc:
            problems.append(f"cgroup v2 {parent}: {exc}")
        else:
            cgroup = MemoryCgroup(parent / leaf, 2)
            cgroup.set_limit(limit)
            return cgroup
    raise CgroupUnavailableError(
        "no writable memory cgroup: " + ("; ".join(problems) or "no memory controller mounted")
    )
