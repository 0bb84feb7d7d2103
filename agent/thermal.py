"""Reading the SoC temperature and the firmware's throttling flags.

Both sources are parameters (a glob of sysfs files, a command name) so tests can point them at a
fake tree; on a Pi 5 they are ``/sys/class/thermal/thermal_zone*/temp`` and ``vcgencmd``.
"""

from __future__ import annotations

import glob
import logging
import shutil
import subprocess
from pathlib import Path

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
