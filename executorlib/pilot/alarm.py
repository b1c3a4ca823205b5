"""An eventfd that becomes readable at a chosen time: the pool's one timer.

The manager thread sleeps in one poll; the pool's deadlines (idle and pending timeouts,
a worker job nearing its end) wake it through this fd, set again after every round.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time


class Alarm:
    """``set(when)`` (``time.monotonic()`` seconds, or None): ``fd`` becomes readable then."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cond = threading.Condition()
        self._when: float | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="executorlib-alarm", daemon=True)
        self._thread.start()

    def set(self, when: float | None) -> None:
        """Set every round of the manager: the thread is woken only for an earlier time
        (a later one it finds when it wakes), so a busy pool costs no thread switches."""
        with self._cond:
            earlier = when is not None and (self._when is None or when < self._when)
            self._when = when
            if earlier:
                self._cond.notify()

    def clear(self) -> None:
        """Consume the wake-up (the manager reads it in its poll loop)."""
        with contextlib.suppress(BlockingIOError):  # already consumed
            os.eventfd_read(self.fd)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        os.close(self.fd)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._when is None:
                    self._cond.wait()
                    continue
                delay = self._when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                self._when = None
                os.eventfd_write(self.fd, 1)
