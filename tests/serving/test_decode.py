"""The decode pool: pixel and memory budgets, decompression bombs, round-robin turns across requests."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import saft.data.images as images_module
from saft.serving import decode
from saft.serving.decode import ImagePool, decode_cost, probe_image
from saft.serving.fetch import FetchPolicy
from saft.serving.protocol import MiB, ImageInput, Limits, RequestError


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels in a few hundred bytes (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _size(image) -> np.ndarray:
    return np.array(image.size, dtype=np.int64)  # "prepared" image: just its size, to see who was decoded


def test_headers_give_size_mode_and_a_cost_before_anything_is_decoded(monkeypatch) -> None:
    monkeypatch.setattr(images_module, "load_rgb", lambda *a, **k: pytest.fail("probing decoded pixels"))
    info = probe_image(_png(300, 200, "I;16"), "instances[0]", Limits())
    assert (info.width, info.height, info.mode, info.format) == (300, 200, "I;16", "PNG")
    assert info.cost == decode_cost(300, 200, "I;16", "PNG") > decode_cost(300, 200, "RGB", "PNG")
    assert decode_cost(1000, 1000, "L") < decode_cost(1000, 1000, "RGB") < decode_cost(1000, 1000, "RGBA")
    assert decode_cost(1000, 1000, "RGB", "WEBP") > decode_cost(1000, 1000, "RGB", "JPEG")


@pytest.mark.parametrize("width, height, needle", [
    (20_000, 20_000, "decompression bomb"),  # past Pillow's own bomb limit: it refuses to open it
    (10_000, 10_000, "10000 x 10000 pixels"),  # past ours (40 MP), below Pillow's
])
def test_a_decompression_bomb_is_413(width, height, needle) -> None:
    bomb = _png_header_only(width, height)
    assert len(bomb) < 200
    with pytest.raises(RequestError) as err:
        probe_image(bomb, "instances[0]", Limits())
    assert err.value.status == 413 and needle in str(err.value)


def test_a_request_over_its_pixel_budget_is_refused_before_decoding(monkeypatch) -> None:
    monkeypatch.setattr(images_module, "load_rgb", lambda *a, **k: pytest.fail("decoded a refused request"))
    pool = ImagePool(_size, Limits(max_request_pixels=2500), FetchPolicy(), workers=2)
    try:
        with pytest.raises(RequestError) as err:
            pool.submit([ImageInput(0, data=_png(40, 40)), ImageInput(1, data=_png(40, 40))])
        assert err.value.status == 413 and "2,500 pixels" in str(err.value)
        assert "--max-request-pixels" in str(err.value)
    finally:
        pool.close()


def test_a_fetched_image_counts_against_the_same_budget(monkeypatch) -> None:
    monkeypatch.setattr(decode, "fetch_url", lambda url, policy: _png(40, 40))
    pool = ImagePool(_size, Limits(max_request_pixels=2500), FetchPolicy(), workers=1)
    try:
        with pytest.raises(RequestError) as err:
            pool.tensors([ImageInput(0, data=_png(40, 40)), ImageInput(1, url="http://images.example/a.png")])
        assert err.value.status == 413 and "--max-request-pixels" in str(err.value)
        assert len(pool.tensors([ImageInput(0, url="http://images.example/a.png")])) == 1
    finally:
        pool.close()


def test_an_image_larger_than_the_whole_memory_budget_is_413() -> None:
    pool = ImagePool(_size, Limits(), FetchPolicy(), workers=1, memory_budget=2 * MiB)
    try:
        with pytest.raises(RequestError) as err:
            pool.submit([ImageInput(3, data=_png(600, 600))])
        assert err.value.status == 413 and "instances[3]" in str(err.value) and "--decode-memory-mb" in str(err.value)
    finally:
        pool.close()


def test_decodes_run_concurrently_only_while_their_costs_fit_the_budget(monkeypatch) -> None:
    real = images_module.load_rgb
    running, peak, lock = [0], [0], threading.Lock()

    def slow(data, name=None):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return real(data, name)

    monkeypatch.setattr(images_module, "load_rgb", slow)
    data = _png(200, 200)
    cost = probe_image(data, "x", Limits()).cost
    pool = ImagePool(_size, Limits(), FetchPolicy(), workers=4, memory_budget=2 * cost + cost // 2)
    try:
        results = [pool.submit([ImageInput(i, data=data) for i in range(4)]) for _ in range(2)]
        for futures in results:
            assert [tuple(f.result(timeout=30)) for f in futures] == [(200, 200)] * 4
        assert peak[0] == 2 and pool.peak_reserved == 2 * cost  # four workers, room for two
        assert pool.reserved == 0
    finally:
        pool.close()


def test_requests_take_turns_instead_of_waiting_for_a_large_one(monkeypatch) -> None:
    """One worker; a request of six images, then two of one: they are decoded second and third, not 7th and 8th."""
    real = images_module.load_rgb
    order, started, go = [], threading.Event(), threading.Event()

    def recording(data, name=None):
        image = real(data, name)
        order.append(image.size[0])
        started.set()
        assert go.wait(30)
        return image

    monkeypatch.setattr(images_module, "load_rgb", recording)
    pool = ImagePool(_size, Limits(), FetchPolicy(), workers=1)
    try:
        big = pool.submit([ImageInput(i, data=_png(30, 30)) for i in range(6)])
        assert started.wait(30)  # the worker is inside the big request's first image
        small = [pool.submit([ImageInput(0, data=_png(w, w))]) for w in (31, 32)]
        go.set()
        for future in big + [f for futures in small for f in futures]:
            future.result(timeout=30)
    finally:
        go.set()
        pool.close()
    assert order[:4] == [30, 30, 31, 32] and order.count(30) == 6  # round-robin: one image per request per turn


def test_after_a_failing_image_the_rest_of_its_request_is_dropped(monkeypatch) -> None:
    real = images_module.load_rgb
    calls = []
    monkeypatch.setattr(images_module, "load_rgb", lambda data, name=None: calls.append(name) or real(data, name))
    broken = _png(64, 64)[:60]  # the header reads, the pixels do not
    pool = ImagePool(_size, Limits(), FetchPolicy(), workers=1)
    try:
        good = _png(64, 64)
        with pytest.raises(RequestError) as err:
            pool.tensors([ImageInput(0, data=good), ImageInput(1, data=broken)] +
                         [ImageInput(i, data=good) for i in range(2, 8)])
        assert err.value.status == 400 and "instances[1]" in str(err.value)
        assert calls == ["instances[0]", "instances[1]"]  # nothing decoded for a request already refused
        assert len(pool.tensors([ImageInput(0, data=good)])) == 1  # the pool goes on
    finally:
        pool.close()
