"""Human durations for the command line: ``90``, ``90s``, ``15m``, ``1h``, ``2d``."""

from __future__ import annotations

import re

from vela.errors import VelaError

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
# Anything longer is a typo (and far longer overflows a timedelta: a traceback).
MAX_DURATION_S = 100 * 366 * 86400


def parse_duration(text: str, *, zero_ok: bool = False) -> int:
    """Seconds in ``text`` (0, as ``0``, ``0s`` or ``0h``, only if ``zero_ok``);
    :class:`VelaError` saying the accepted forms otherwise."""
    m = _RE.match(text.lower())
    if not m or int(m.group(1)) < (0 if zero_ok else 1):
        least = "0 or more" if zero_ok else "a positive number"
        raise VelaError(f"invalid duration {text!r}: use {least} with s, m, h or d "
                        "(e.g. 15m, 1h)")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION_S:
        raise VelaError(f"invalid duration {text!r}: at most 100 years")
    return seconds
