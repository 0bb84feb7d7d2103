"""Reading the SoC temperature and the firmware's throttling flags.

Both sources are parameters (a glob of sysfs files, a command name) so tests can point them at a
fake tree; on a Pi 5 they are ``/sys/class/thermal/thermal_zone*/temp`` and ``vcgencmd``.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

THROTTLE_FLAGS: dict[str, int] = {
    "under_voltage": 0,
    "arm_frequency_capped": 1,
    "throttled": 2,
    "soft_temperature_limit": 3,
}
"""Bit of each flag in ``vcgencmd get_throttled``; the same flag 'since boot' is 16 bits up."""
SINCE_BOOT_SHIFT = 16
_VCGENCMD_TIMEOUT_S = 2.0


def read_temperature_c(pattern: str) -> float | None:
    """Return the hottest thermal zone in degrees Celsius, or None when none can be read.

    Args:
        pattern: Glob of files that each hold one temperature in millidegrees Celsius.
    """
    readings = []
    for path in sorted(glob.glob(pattern)):  # noqa: PTH207 - the pattern is absolute
        try:
            readings.append(int(Path(path).read_text(encoding="ascii").strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(readings) if readings else None


def read_throttled(command: str) -> int | None:
    """Return the bit field of ``vcgencmd get_throttled``, or None where it cannot be run.

    Args:
        command: The vcgencmd command name or path.
    """
    executable = shutil.which(command)
    if executable is None:
        return None
    try:
        completed = subprocess.run(  # noqa: S603 - a fixed argument list, no shell
            [executable, "get_throttled"],
            capture_output=True,
            text=True,
            timeout=_VCGENCMD_TIMEOUT_S,
            check=False,
        )
        _, _, value = completed.stdout.strip().partition("=")
        return int(value, 16)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        log.debug("vcgencmd get_throttled failed: %s", exc)
        return None


def flags_now(bits: int) -> dict[str, bool]:
    """Return which throttling conditions are active now."""
    return {name: bool(bits >> bit & 1) for name, bit in THROTTLE_FLAGS.items()}


def flags_since_boot(bits: int) -> dict[str, bool]:
    """Return which throttling conditions occurred since boot."""
    return {
        name: bool(bits >> (bit + SINCE_BOOT_SHIFT) & 1) for name, bit in THROTTLE_FLAGS.items()
    }


class ThermalGuard:
    """Holds new jobs back while the SoC is hot: pause at ``pause_c``, resume below ``resume_c``.

    The gap between the two (hysteresis) keeps the agent from starting a job every time the
    temperature dips a fraction of a degree below the limit.
    """

    def __init__(
        self,
        pattern: str,
        pause_c: float,
        resume_c: float,
        poll_s: float,
        on_change: Callable[[], None],
    ) -> None:
        """Create the guard.

        Args:
            pattern: Temperature files (see :func:`read_temperature_c`).
            pause_c: At or above this, no new job starts.
            resume_c: Below this, jobs start again.
            poll_s: How often the temperature is read while cooling.
            on_change: Called when :attr:`cooling` changes.
        """
        self._pattern = pattern
        self._pause_c = pause_c
        self._resume_c = resume_c
        self._poll_s = poll_s
        self._on_change = on_change
        self.cooling = False

    async def wait_until_cool(self) -> None:
        """Return at once when the SoC is below ``pause_c``, else once it is below ``resume_c``."""
        temperature = await asyncio.to_thread(read_temperature_c, self._pattern)
        if temperature is None or temperature < self._pause_c:
            return
        log.warning("SoC at %.1f °C: pausing until below %.1f °C", temperature, self._resume_c)
        self._set(cooling=True)
        try:
            while temperature is not None and temperature >= self._resume_c:
                await asyncio.sleep(self._poll_s)
                temperature = await asyncio.to_thread(read_temperature_c, self._pattern)
        finally:
            self._set(cooling=False)
        log.info("SoC cooled down; resuming")

    def _set(self, *, cooling: bool) -> None:
        self.cooling = cooling
        self._on_change()
