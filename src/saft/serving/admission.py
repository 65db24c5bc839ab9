"""What a request must get through before the model works for it: its body, then a slot.

Order matters against slow and hostile clients:

1. **The body is read first, with a deadline, outside any slot.** A client that declares a
   body and then sends it slowly (or never) holds a socket and its share of the body
   budget, not a slot: honest requests keep being served. A body not complete within
   ``body_timeout_s`` is answered 408 and the connection closed; one over the size limit
   413 (from its Content-Length before anything is read, or as soon as a streamed body
   passes the limit).
2. **Bodies held in memory are budgeted** (``max_buffered_bytes``): a body is admitted
   only while the bytes of all bodies being read or served fit (a declared length is
   reserved whole up front, a streamed one chunk by chunk); else 503 with Retry-After.
3. **A slot** (``slots``, the requests parsed, decoded and classified at once). Requests
   beyond it wait in a queue of at most ``max_waiting``; a request arriving at a full
   queue is refused at once, 503 with Retry-After, instead of waiting behind work the
   server cannot finish in time.

The server is **saturated** (``/v2/health/ready`` answers 503 with the reason, so Kubernetes
stops routing new requests to it) while the oldest queued request has waited more than
``saturation_s``, and for ``saturation_s`` after any request was refused as busy.
Liveness is unaffected: a saturated server is alive and must not be restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from saft.serving.protocol import MiB, RequestError

# An undeclared (chunked) body over the limit is read and discarded up to this many times the
# limit before the 413 goes out: a client that is still sending would otherwise see its connection
# reset instead of the answer. Past it the connection is cut.
_DRAIN_FACTOR = 16


class Busy(RequestError):
    """503: the server refuses more work now; the client should retry (``Retry-After``)."""

    def __init__(self, message: str):
        super().__init__(message, 503)


class Admission:
    """Body budget, slots and wait queue of one server (module docstring); used from one event loop."""

    def __init__(self, slots: int, max_waiting: int, max_buffered_bytes: int, body_timeout_s: float,
                 saturation_s: float, clock=time.monotonic):
        if slots < 1 or max_waiting < 0 or max_buffered_bytes < 1 or body_timeout_s <= 0 or saturation_s <= 0:
            raise ValueError("admission needs at least one slot, a positive body budget, body timeout and "
                             "saturation time, and a non-negative queue")
        self.slots, self.max_waiting = slots, max_waiting
        self.max_buffered, self.body_timeout_s, self.saturation_s = max_buffered_bytes, body_timeout_s, saturation_s
        self.clock = clock
        self.free = slots
        self.buffered = 0  # bytes of bodies reserved (being read, or held by a request in progress)
        self.waiting: deque[tuple[asyncio.Future, float]] = deque()
        self.last_busy: float | None = None
        self.refused_busy = 0

    # -- the body budget ---------------------------------------------------------------------
    def _take(self, size: int) -> None:
        if self.buffered + size > self.max_buffered:
            self._busy_now()
            raise Busy(f"the server holds {self.buffered / MiB:.1f} MiB of request bodies, its budget is "
                       f"{self.max_buffered / MiB:g} MiB (--max-buffered-mb): retry shortly")
        self.buffered += size

    def give_back(self, size: int) -> None:
        self.buffered -= size

    async def read_body(self, request, limit: int) -> tuple[bytes, int]:
        """The body of ``request`` and the bytes reserved for it (give them back with :meth:`give_back`)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and len(declared) < 20 and int(declared) > limit:
            raise RequestError(f"request body is {int(declared) / MiB:.1f} MiB, more than the {limit / MiB:g} MiB "
                               "limit: send fewer images per request", 413)
        reserved = int(declared) if declared.isdigit() and len(declared) < 20 else 0
        self._take(reserved)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > reserved and size <= limit:
                        self._take(size - reserved)
                        reserved = size
                    if size > limit:
                        chunks = []  # keep nothing; read on (up to a bound) so the client gets the answer
                        if size > _DRAIN_FACTOR * limit:
                            break
                        continue
                    chunks.append(chunk)
        except TimeoutError:
            self.give_back(reserved)
            raise RequestError(f"the request body did not arrive within {self.body_timeout_s:g} s (received "
                               f"{size:,} bytes): send it at once", 408) from None
        except BaseException:
            self.give_back(reserved)
            raise
        if size > limit:
            self.give_back(reserved)
            raise RequestError(f"request body is more than the {limit / MiB:g} MiB limit: send fewer images per "
                               "request", 413)
        return b"".join(chunks), reserved

    # -- slots -------------------------------------------------------------------------------
    def _busy_now(self) -> None:
        self.last_busy = self.clock()
        self.refused_busy += 1

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        if len(self.waiting) >= self.max_waiting:
            self._busy_now()
            raise Busy(f"all {self.slots} slots are busy and {len(self.waiting)} requests wait (--max-concurrent, "
                       "--max-queue): retry shortly")
        entry = (asyncio.get_running_loop().create_future(), self.clock())
        self.waiting.append(entry)
        try:
            await entry[0]  # a slot is handed over by release()
        except BaseException:
            if entry in self.waiting:
                self.waiting.remove(entry)
            elif entry[0].done() and not entry[0].cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            raise

    def release(self) -> None:
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.free += 1

    @property
    def in_progress(self) -> int:
        return self.slots - self.free

    def oldest_wait_s(self) -> float:
        return self.clock() - self.waiting[0][1] if self.waiting else 0.0

    def saturation(self) -> str | None:
        """Why the server should not get new requests now, or None."""
        wait = self.oldest_wait_s()
        if wait > self.saturation_s:
            return (f"saturated: the oldest of {len(self.waiting)} queued requests has waited {wait:.1f} s "
                    f"(all {self.slots} slots busy)")
        if self.last_busy is not None and self.clock() - self.last_busy < self.saturation_s:
            return f"saturated: a request was refused as busy {self.clock() - self.last_busy:.1f} s ago"
        return None
