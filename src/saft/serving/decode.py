"""Decoding request images with bounded cost: a pixel budget, a memory budget, fair turns.

A compressed image says nothing about what it costs to decode: a 170 KB PNG can declare
40 megapixels of 16-bit gray, and decoding it (with the project's one decoder,
``saft.data.images.load_rgb``, which widens 16-bit data to scale it) takes about 1.4 GB.
So every image's header is read first (:func:`probe_image`, no pixel decoded) and its
decode is costed from its declared size and mode (:func:`decode_cost`, measured below).
Then three bounds hold:

* **per image**: at most ``Limits.max_image_pixels`` pixels (413 otherwise, also for what
  Pillow itself calls a decompression bomb);
* **per request**: the images of one request declare at most ``Limits.max_request_pixels``
  pixels together (413 before anything is decoded);
* **in total**: decodes run concurrently only while their estimated costs fit in the
  pool's memory budget (``--decode-memory-mb``; default: a quarter of the memory limit of
  the container, or of the machine); an image that could never fit is refused with 413.

The pool's workers take images **round-robin across requests**, not first-come-first-served:
a request of 64 large images gets one turn per round like a request of one small image, so
the small one waits for at most one image of each other request (and for memory), never
for all of them. Within a request, images are taken in order; once one fails, the rest of
that request is dropped (its answer is the first failing instance's error).

Cost model: bytes per pixel at the peak of ``load_rgb`` + resize, measured with Pillow 11
on 3000 x 3000 images (RGB JPEG/PNG about 11, CMYK JPEG 12, RGBA PNG 24, 16-bit gray PNG
31, WebP 20, 8-bit gray 5), rounded up, plus 4 bytes per pixel for the copy an EXIF
rotation makes.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

from saft.serving.fetch import FetchPolicy, fetch_url
from saft.serving.protocol import MiB, ImageInput, Limits, RequestError

log = logging.getLogger(__name__)

_BYTES_PER_PIXEL = {"1": 8, "L": 8, "P": 12, "RGB": 12, "YCbCr": 12, "CMYK": 12, "LAB": 12, "HSV": 12,
                    "LA": 24, "La": 24, "PA": 24, "RGBA": 24, "RGBa": 24}
_WIDE = 32  # 16- and 32-bit modes (I;16*, I, F): load_rgb scales them in wide arithmetic
_FORMAT_FLOOR = {"WEBP": 20}  # libwebp decodes into buffers of its own first
_ROTATION = 4
_FIXED = 1 * MiB  # decoder state, the prepared 8-bit crop, bookkeeping
_TRIM_ABOVE = 64 * MiB


def _libc():
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def _return_free_memory() -> None:
    """glibc: give the memory a large decode freed back to the system.

    glibc keeps freed memory in its per-thread heaps, and after the first large free it serves
    buffers up to 32 MiB from them rather than from mappings of their own; with four decode
    threads the process kept its peak far above what the budget allows at once (160 MiB budget:
    +310 MiB at peak; trimmed after each large decode: +143 MiB, tests/serving/test_hostile_clients.py's
    scenario). Trimming only after decodes over 64 MiB costs the hot path nothing.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header declares, and the memory its decode is budgeted at."""

    width: int
    height: int
    mode: str
    format: str
    cost: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def decode_cost(width: int, height: int, mode: str, fmt: str = "") -> int:
    """Estimated peak bytes of decoding (``load_rgb``) and resizing one image (module docstring)."""
    per_pixel = max(_BYTES_PER_PIXEL.get(mode, _WIDE), _FORMAT_FLOOR.get(fmt.upper(), 0))
    return width * height * (per_pixel + _ROTATION) + _FIXED


def probe_image(data: bytes, where: str, limits: Limits) -> ImageInfo:
    """The header of ``data``: size, mode, format and decode cost; 400 if unreadable, 413 if too large."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
            mode, fmt = probe.mode, probe.format or ""
            transparent = "transparency" in probe.info
    except Image.DecompressionBombError as exc:
        raise RequestError(f"{where} is refused as a decompression bomb ({exc}): send a smaller image", 413) from None
    except UnidentifiedImageError:
        raise RequestError(f"{where} is not a readable image: no format this server reads (PNG, JPEG, WebP, TIFF, "
                           f"BMP, GIF, ...) matches its {len(data)} bytes starting {data[:8]!r}") from None
    except Exception as exc:  # Pillow raises many types for damaged headers
        raise RequestError(f"{where} is not a readable image ({type(exc).__name__}: {exc})") from None
    if width * height > limits.max_image_pixels:
        raise RequestError(f"{where} is {width} x {height} pixels, more than the limit of "
                           f"{limits.max_image_pixels:,} pixels: send a smaller image", 413)
    # a transparency key sends P, L and RGB images through load_rgb's RGBA compositing
    cost = decode_cost(width, height, "RGBA" if transparent else mode, fmt)
    return ImageInfo(width, height, mode, fmt, cost)


def memory_limit_bytes() -> int:
    """The container's memory limit (cgroup v2 or v1), else the machine's memory."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_decode_budget() -> int:
    """A quarter of the memory limit, at least 256 MiB."""
    return max(256 * MiB, memory_limit_bytes() // 4)


class _Request:
    """One request's images, waiting for their turns."""

    def __init__(self, items: Sequence[ImageInput], infos: list, pixels_left: int):
        self.pending = deque(range(len(items)))
        self.items, self.infos = list(items), infos
        self.futures: list[Future] = [Future() for _ in items]
        self.pixels_left = pixels_left
        self.failed = False


class ImagePool:
    """Fetch, decode and prepare the images of requests in worker threads, within the budgets above.

    ``prepare`` turns a decoded PIL image into model input (``Classifier.prepare``).
    :meth:`submit` returns one future per image; :meth:`tensors` waits for them.
    """

    def __init__(self, prepare: Callable, limits: Limits, policy: FetchPolicy, workers: int | None = None,
                 memory_budget: int | None = None):
        self.prepare, self.limits, self.policy = prepare, limits, policy
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.memory_budget = memory_budget or default_decode_budget()
        self.reserved = 0  # bytes of the budget held by decodes in progress
        self.peak_reserved = 0
        self.decoded = 0
        self._cv = threading.Condition()
        self._turns: deque[_Request] = deque()  # requests with images left, in round-robin order
        self._tickets: deque[object] = deque()  # workers waiting for memory, served in order
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"saft-decode-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    # -- admission ---------------------------------------------------------------------------
    def _admit_info(self, info: ImageInfo, where: str, request: _Request | None) -> None:
        if info.cost > self.memory_budget:
            raise RequestError(f"{where} ({info.width} x {info.height}, {info.mode}) needs about "
                               f"{info.cost / MiB:.0f} MiB to decode, more than this server's decode memory budget of "
                               f"{self.memory_budget / MiB:.0f} MiB (--decode-memory-mb): send a smaller image", 413)
        if request is not None:
            with self._cv:
                if info.pixels > request.pixels_left:
                    raise self._too_many_pixels()
                request.pixels_left -= info.pixels

    def _too_many_pixels(self) -> RequestError:
        return RequestError(f"the images of this request have more than {self.limits.max_request_pixels:,} pixels "
                            "together (the server's --max-request-pixels): send them in several requests", 413)

    def submit(self, items: Sequence[ImageInput]) -> list[Future]:
        """Queue a request's images; one future per image (the prepared array, or a RequestError).

        Images given as bytes are probed here, before anything is queued: a request over the
        pixel budget, or with an image that is unreadable or too large, raises its RequestError
        now. Call it from a worker thread, not an event loop (probing reads headers).
        """
        infos, total = [], 0
        for item in items:
            info = None
            if item.data is not None:
                info = probe_image(item.data, f"instances[{item.index}]", self.limits)
                self._admit_info(info, f"instances[{item.index}]", None)
                total += info.pixels
                if total > self.limits.max_request_pixels:
                    raise self._too_many_pixels()
            infos.append(info)
        request = _Request(items, infos, self.limits.max_request_pixels - total)
        with self._cv:
            if self._closed:
                raise RuntimeError("the image pool is closed")
            if items:
                self._turns.append(request)
                self._cv.notify_all()
        return request.futures

    # -- workers -----------------------------------------------------------------------------
    def _next(self) -> tuple[_Request, int] | None:
        with self._cv:
            while not self._turns and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            request = self._turns.popleft()
            position = request.pending.popleft()
            if request.pending:
                self._turns.append(request)  # its next image waits for the next round
            return request, position

    def _reserve(self, cost: int) -> None:
        with self._cv:
            ticket = object()
            self._tickets.append(ticket)
            while self._tickets[0] is not ticket or (self.reserved and self.reserved + cost > self.memory_budget):
                self._cv.wait()
            self._tickets.popleft()
            self.reserved += cost
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            self._cv.notify_all()

    def _release(self, cost: int) -> None:
        with self._cv:
            self.reserved -= cost
            self._cv.notify_all()

    def _one(self, request: _Request, position: int):
        from saft.data.images import ImageDecodeError, load_rgb

        item, info = request.items[position], request.infos[position]
        where = f"instances[{item.index}]"
        data = item.data
        if data is None:
            data = fetch_url(item.url, self.policy)
            where = f"{where}.url ({item.url})"
            info = probe_image(data, where, self.limits)
            self._admit_info(info, where, request)
        self._reserve(info.cost)
        try:
            try:
                image = load_rgb(data, where)
            except ImageDecodeError as exc:
                raise RequestError(f"{where} is not a readable image ({exc})") from None
            del data
            return self.prepare(image)
        finally:
            self._release(info.cost)
            if info.cost >= _TRIM_ABOVE:
                _return_free_memory()

    def _drop_rest(self, request: _Request) -> None:
        with self._cv:
            request.failed = True
            if request in self._turns:
                self._turns.remove(request)
            while request.pending:
                _cancel(request.futures[request.pending.popleft()])

    def _work(self) -> None:
        while True:
            got = self._next()
            if got is None:
                return
            request, position = got
            future = request.futures[position]
            if request.failed or future.cancelled() or not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._one(request, position))
                with self._cv:
                    self.decoded += 1
            except RequestError as exc:
                future.set_exception(exc)
                self._drop_rest(request)
            except Exception as exc:  # an unexpected failure: the server answers 500 and logs it
                log.exception("decoding instances[%d] failed", request.items[position].index)
                future.set_exception(exc)
                self._drop_rest(request)

    # -- results -----------------------------------------------------------------------------
    def tensors(self, items: Sequence[ImageInput]):
        """The prepared batch of ``items`` (blocking); the first failing instance raises its error."""
        from concurrent.futures import wait

        futures = self.submit(items)
        wait(futures)
        return gather(futures)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for request in self._turns:
                for position in request.pending:
                    _cancel(request.futures[position])
            self._turns.clear()
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)


def _cancel(future: Future) -> None:
    # cancel() alone wakes done-callbacks (asyncio) but not concurrent.futures.wait(); this does both
    future.cancel()
    future.set_running_or_notify_cancel()


def stack(items: list):
    """One batch tensor from prepared images (8-bit arrays, or float tensors of a custom preprocess)."""
    import numpy as np
    import torch

    if items and isinstance(items[0], np.ndarray):
        return torch.from_numpy(np.stack(items))  # numpy copies: no torch kernel in a decode thread
    return torch.stack(items)


def gather(futures: Sequence[Future]):
    """The batch of finished futures; the lowest-index failure is raised."""
    results = []
    for future in futures:
        if future.cancelled():  # dropped after an earlier failure of the same request
            continue
        exc = future.exception()
        if exc is not None:
            raise exc
        results.append(future.result())
    if len(results) != len(futures):
        raise RuntimeError("images of a request were dropped without a failure")
    return stack(results)
