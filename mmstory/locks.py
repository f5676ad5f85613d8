"""A first-come, first-served lock: requests waiting for the model are served in arrival order."""

from __future__ import annotations

import threading
from collections import deque


class FairLock:
    """Like `threading.Lock` (acquire/release, `with`, released from any thread), but waiters get it in the order they
    asked: under load a plain lock lets a late request overtake early ones many times, which stretches the slowest
    answers (p95 latency) for nothing."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[object] = deque()
        self._held = False

    def acquire(self, blocking: bool = True) -> bool:
        ticket = object()
        with self._cond:
            if not blocking:  # only when free and nobody is waiting: a non-blocking caller does not jump the queue
                if self._held or self._queue:
                    return False
                self._held = True
                return True
            self._queue.append(ticket)
            try:
                while self._held or self._queue[0] is not ticket:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: give the place up
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._held = True
        return True

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            self._held = False
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
