"""Laptop side: the futures a RemoteExecutor hands out, and the acknowledgements that
let the agent forget an outcome once the laptop holds it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future


class RemoteFuture(Future):
    """A Future whose ``cancel()`` tells the truth about a call on the cluster: True for
    a call that will not run (not sent yet, or still queued in the agent), False once
    it runs there (it then finishes). Asking the agent takes one round trip; from a
    done-callback run by this executor's reader thread it cannot ask and answers False."""

    def __init__(self, ask: Callable[[list[Future]], None]) -> None:
        super().__init__()
        self._ask = ask

    def cancel(self) -> bool:
        """Cancel the call if it has not started on the cluster (see the class)."""
        if self.running():
            return False
        if not self.done():
            self._ask([self])
        return self.cancelled()


class Acks:
    """Outcome ids to acknowledge, sent in batches by one thread: the reader never
    waits behind a large Submit being written, and a burst of results costs few messages."""

    def __init__(self, send: Callable[[tuple[int, ...]], None]) -> None:
        self._send, self._ids, self._closed = send, [], False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="executorlib-ssh-ack", daemon=True)
        self._thread.start()

    def add(self, call_id: int) -> None:
        with self._ready:
            self._ids.append(call_id)
            self._ready.notify()

    def close(self) -> None:
        """Send what is left, then end the thread."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._ids or self._closed)
                if not self._ids:
                    return
                ids, self._ids = tuple(self._ids), []
            self._send(ids)
