"""Warnings about refused input, rate-limited: a flood logs a summary, not a line per message.

Each kind of warning (``kind``: a short fixed name such as ``"malformed
message"``) logs its first ``burst`` occurrences in every ``window`` seconds;
the rest are counted, and one line per kind says how many were left out when
the window ends. Messages must never carry payloads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["LogThrottle"]


class LogThrottle:
    """Rate-limited warnings on one logger. Not thread-safe: one owner (an I/O thread)."""

    def __init__(self, log: logging.Logger, *, burst: int = 10, window: float = 10.0) -> None:
        self._log = log
        self._burst = burst
        self._window = window
        self._start = time.monotonic()
        self._counts: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: Any) -> None:
        """Log ``message % args`` unless ``kind`` has used its burst in this window."""
        now = time.monotonic()
        if now - self._start >= self._window:
            self.flush(now)
        count = self._counts[kind] = self._counts.get(kind, 0) + 1
        if count <= self._burst:
            self._log.warning(message, *args)
        elif count == self._burst + 1:
            self._log.warning(
                "more '%s' warnings in this %g s window are counted, not logged", kind, self._window
            )

    def flush(self, now: float | None = None) -> None:
        """Log how many warnings of each kind were left out, and start a new window."""
        for kind, count in self._counts.items():
            if count > self._burst:
                self._log.warning(
                    "%d '%s' warnings were not logged in the last %g s",
                    count - self._burst,
                    kind,
                    self._window,
                )
        self._counts.clear()
        self._start = time.monotonic() if now is None else now
