"""Admission: body deadline and budget, slots, a bounded queue, and the saturation readiness reports."""

from __future__ import annotations

import asyncio

import pytest

from saft.serving.admission import Admission, Busy
from saft.serving.protocol import RequestError


class _Request:
    """What Admission reads of a Starlette request: headers and a body stream."""

    def __init__(self, chunks, length: int | None = None, delay: float = 0.0):
        self.headers = {"content-length": str(length)} if length is not None else {}
        self.chunks, self.delay = chunks, delay

    async def stream(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.delay)
            yield chunk


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _admission(**kw) -> Admission:
    args = dict(slots=1, max_waiting=1, max_buffered_bytes=150, body_timeout_s=5.0, saturation_s=2.0)
    args.update(kw)
    return Admission(**args)


def test_bodies_are_budgeted_and_given_back() -> None:
    async def main():
        gate = _admission()
        body, reserved = await gate.read_body(_Request([b"x" * 60, b"y" * 40], length=100), limit=1000)
        assert body == b"x" * 60 + b"y" * 40 and reserved == 100 and gate.buffered == 100
        with pytest.raises(Busy, match="--max-buffered-mb"):  # declared: reserved whole, before reading
            await gate.read_body(_Request([b"z" * 100], length=100), limit=1000)
        with pytest.raises(Busy):  # streamed (chunked): reserved chunk by chunk
            await gate.read_body(_Request([b"z" * 30, b"z" * 30]), limit=1000)
        assert gate.buffered == 100  # the refused ones gave back what they took
        gate.give_back(reserved)
        body, reserved = await gate.read_body(_Request([b"z" * 30, b"z" * 30]), limit=1000)
        assert reserved == 60 and gate.buffered == 60
        with pytest.raises(RequestError) as err:
            await gate.read_body(_Request([], length=2000), limit=1000)
        assert err.value.status == 413
        assert gate.saturation() is not None and "refused as busy" in gate.saturation()

    asyncio.run(main())


def test_a_body_that_does_not_arrive_in_time_is_408_and_frees_its_share() -> None:
    async def main():
        gate = _admission(body_timeout_s=0.2)
        with pytest.raises(RequestError) as err:
            await gate.read_body(_Request([b"x"] * 100, length=100, delay=0.05), limit=1000)
        assert err.value.status == 408 and "0.2 s" in str(err.value)
        assert gate.buffered == 0

    asyncio.run(main())


def test_slots_queue_and_saturation() -> None:
    clock = _Clock()

    async def main():
        gate = _admission(clock=clock)
        await gate.acquire()
        assert gate.in_progress == 1 and gate.saturation() is None
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert len(gate.waiting) == 1 and not waiter.done()
        clock.now += 1.0
        assert gate.saturation() is None  # waiting 1 s, below the 2 s threshold
        clock.now += 1.5
        assert "oldest of 1 queued requests has waited 2.5 s" in gate.saturation()
        with pytest.raises(Busy, match="--max-queue"):  # the queue is full: refused at once
            await gate.acquire()
        gate.release()  # the slot passes to the waiter
        await asyncio.wait_for(waiter, 5)
        assert gate.in_progress == 1 and not gate.waiting
        assert "refused as busy" in gate.saturation()
        clock.now += 2.5
        assert gate.saturation() is None  # the refusal is old news
        gate.release()
        assert gate.free == 1

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def main():
        gate = _admission(max_waiting=4)
        await gate.acquire()
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not gate.waiting
        gate.release()
        assert gate.free == 1

    asyncio.run(main())


def test_settings_must_be_sensible() -> None:
    with pytest.raises(ValueError):
        _admission(slots=0)
