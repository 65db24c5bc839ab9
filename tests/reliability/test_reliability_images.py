"""Unusual but valid images reach the model as upright 8-bit RGB, in training and evaluation alike.

Each kind of file is generated with Pillow; the expected RGB values are worked out by hand
(not by calling the code under test), so a regression to Pillow's plain ``convert("RGB")``
(16-bit clipped to white, alpha dropped to the hidden colour) or a forgotten EXIF
orientation fails here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saft.data.dataset import ManifestDataset
from saft.data.imagefolder import ImageEntry
from saft.data.images import ImageDecodeError, load_rgb
from saft.data.manifest import hash_entries
from saft.data.validate import validate_root
from saft.steps.evaluate import EntryImages

torch.set_num_threads(1)

W, H = 64, 32  # not square, so a transposed image has the wrong size


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gray16() -> bytes:
    # 16-bit ramp 0..65535 in steps of 257*k: 8-bit value k after scaling.
    values = (np.arange(W * H, dtype=np.uint32) % 256 * 257).astype(np.uint16).reshape(H, W)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return _save(image, "PNG")


def _expected_gray16() -> np.ndarray:
    return np.repeat((np.arange(W * H) % 256).astype(np.uint8).reshape(H, W)[..., None], 3, axis=2)


def _rgba() -> bytes:
    # Left half opaque red; right half fully transparent but storing black (the hidden colour).
    array = np.zeros((H, W, 4), dtype=np.uint8)
    array[:, : W // 2] = (200, 10, 10, 255)
    array[:, W // 2 :] = (0, 0, 0, 0)
    return _save(Image.fromarray(array), "PNG")


def _half_transparent_expected() -> np.ndarray:
    out = np.full((H, W, 3), 255, dtype=np.uint8)
    out[:, : W // 2] = (200, 10, 10)
    return out


def _la() -> bytes:
    array = np.zeros((H, W, 2), dtype=np.uint8)
    array[:, : W // 2] = (90, 255)
    array[:, W // 2 :] = (0, 0)
    return _save(Image.fromarray(array), "PNG")


def _palette(transparent: bool) -> bytes:
    image = Image.new("P", (W, H), 0)
    image.putpalette([200, 10, 10, 0, 0, 0] + [0] * (254 * 3))
    image.paste(1, (W // 2, 0, W, H))  # right half: palette index 1 (black)
    kw = {"transparency": 1} if transparent else {}
    return _save(image, "PNG", **kw)


def _cmyk() -> bytes:
    # Pure cyan ink, no black: RGB (0, 255, 255) under Pillow's standard conversion.
    return _save(Image.new("CMYK", (W, H), (255, 0, 0, 0)), "TIFF")


def _gray(mode: str) -> bytes:
    return _save(Image.new(mode, (W, H), 1 if mode == "1" else 77), "PNG")


def _uniform(rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (H, W, 3))


def _palette_opaque_expected() -> np.ndarray:
    out = np.zeros((H, W, 3), dtype=np.uint8)
    out[:, : W // 2] = (200, 10, 10)
    return out


KINDS = {
    # name: (file bytes, expected RGB pixels)
    "gray16_png": (_gray16, _expected_gray16),
    "rgba_on_white": (_rgba, _half_transparent_expected),
    "la_on_white": (_la, lambda: np.where(np.arange(W)[None, :, None] < W // 2, 90, 255).repeat(H, 0).repeat(3, 2).astype(np.uint8)),
    "palette_opaque": (lambda: _palette(False), _palette_opaque_expected),
    "palette_transparent": (lambda: _palette(True), _half_transparent_expected),
    "cmyk": (_cmyk, lambda: _uniform((0, 255, 255))),
    "grayscale_L": (lambda: _gray("L"), lambda: _uniform((77, 77, 77))),
    "bilevel_1": (lambda: _gray("1"), lambda: _uniform((255, 255, 255))),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unusual_images_decode_to_expected_rgb(kind: str) -> None:
    make, expected = KINDS[kind]
    image = load_rgb(make(), kind)
    assert image.mode == "RGB" and image.size == (W, H)
    np.testing.assert_array_equal(np.asarray(image), expected())


def test_cmyk_jpeg_decodes() -> None:
    # CMYK JPEGs (print workflows) are lossy, so only approximately cyan.
    image = load_rgb(_save(Image.new("CMYK", (W, H), (255, 0, 0, 0)), "JPEG", quality=95), "cmyk.jpg")
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(int) - (0, 255, 255)).max() <= 8


def test_32bit_integer_gray_is_scaled_from_the_16_bit_range() -> None:
    image = load_rgb(_save(Image.new("I", (W, H), 257 * 100), "TIFF"), "i32.tif")
    np.testing.assert_array_equal(np.asarray(image), _uniform((100, 100, 100)))


# --- EXIF orientation -------------------------------------------------------------------------


def _upright_pattern() -> np.ndarray:
    """Quadrants red / green over blue / white, 16-pixel blocks (JPEG-friendly)."""
    out = np.zeros((H, W, 3), dtype=np.uint8)
    out[: H // 2, : W // 2] = (255, 0, 0)
    out[: H // 2, W // 2 :] = (0, 255, 0)
    out[H // 2 :, : W // 2] = (0, 0, 255)
    out[H // 2 :, W // 2 :] = (255, 255, 255)
    return out


# The stored pixels for each EXIF orientation, derived from the tag's definition (which
# stored row/column is the visual top/left), not from Pillow: a viewer undoes these.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: np.rot90(a, 2),  # upside down
    4: lambda a: a[::-1],  # mirrored vertically
    5: lambda a: np.transpose(a, (1, 0, 2)),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, 1),  # stored turned 90 deg counter-clockwise: display turns it clockwise
    7: lambda a: np.rot90(np.transpose(a, (1, 0, 2)), 2),  # anti-diagonal mirror
    8: lambda a: np.rot90(a, -1),  # stored turned clockwise
}


def _quadrant_means(array: np.ndarray) -> list[tuple[int, ...]]:
    h, w = array.shape[:2]
    blocks = [array[: h // 2, : w // 2], array[: h // 2, w // 2 :], array[h // 2 :, : w // 2], array[h // 2 :, w // 2 :]]
    return [tuple(int(round(c)) for c in b.reshape(-1, 3).mean(0)) for b in blocks]


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_rotated_jpeg_is_read_upright(orientation: int) -> None:
    stored = np.ascontiguousarray(STORED[orientation](_upright_pattern()))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    image = load_rgb(data, "rotated.jpg")
    assert image.size == (W, H)
    got = _quadrant_means(np.asarray(image))
    want = _quadrant_means(_upright_pattern())
    assert all(abs(g - w) <= 20 for gq, wq in zip(got, want) for g, w in zip(gq, wq)), (got, want)


def test_damaged_exif_keeps_the_pixels(caplog) -> None:
    data = _save(Image.fromarray(_upright_pattern()), "JPEG", quality=95, exif=b"Exif\x00\x00garbage-not-tiff")
    image = load_rgb(data, "odd-exif.jpg")
    assert image.size == (W, H)


# --- one decoder for training, evaluation and validation ------------------------------------


@pytest.fixture
def unusual_tree(tmp_path: Path) -> tuple[Path, list[ImageEntry]]:
    root = tmp_path / "root"
    entries = []
    for label, kind in enumerate(sorted(KINDS)):
        path = root / kind / f"{kind}.png"
        path.parent.mkdir(parents=True)
        path.write_bytes(KINDS[kind][0]())
        entries.append(ImageEntry(f"{kind}/{kind}.png", label, kind))
    rotated = root / "rotated" / "r.jpg"
    rotated.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.write_bytes(_save(Image.fromarray(np.ascontiguousarray(STORED[6](_upright_pattern()))), "JPEG",
                              quality=95, exif=exif))
    entries.append(ImageEntry("rotated/r.jpg", len(entries), "rotated"))
    return root, entries


def _as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).copy()


def test_training_and_evaluation_decode_alike(unusual_tree) -> None:
    root, entries = unusual_tree
    train = ManifestDataset(hash_entries(root, entries), root, _as_array)
    evaluate = EntryImages(str(root), entries, _as_array)
    for i, entry in enumerate(entries):
        a, label_a = train[i]
        b, label_b = evaluate[i]
        assert label_a == label_b == entry.label
        assert a.shape == (H, W, 3), entry.path  # rotated one included: upright, not 32 wide
        np.testing.assert_array_equal(a, b)
        if entry.class_name in KINDS:
            np.testing.assert_array_equal(a, KINDS[entry.class_name][1]())


def test_validation_accepts_unusual_images(unusual_tree) -> None:
    root, _ = unusual_tree
    report = validate_root(root)
    assert report.ok, report.format()


def test_undecodable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(_gray16()[:60])
    with pytest.raises(ImageDecodeError, match=r"broken\.png"):
        load_rgb(path)
    with pytest.raises(OSError, match="s3://b/x.png"):  # still an OSError for existing handlers
        load_rgb(b"not an image", "s3://b/x.png")
