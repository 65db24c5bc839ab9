"""The one place images are decoded for training, scoring, evaluation and validation.

Real datasets hold more than 8-bit RGB JPEGs: scanned CMYK files, 16-bit PNGs from
microscopes and medical devices, grayscale and palette images, logos with transparency,
phone photos stored sideways with an EXIF ``Orientation`` tag. Every such file is a valid
image and must reach the model as the picture a person would see, so :func:`load_rgb`
turns them all into upright 8-bit RGB, and validation calls the same function, so a file
that passes ``saft data validate`` is one training can read.

Conversions (all deterministic, none depends on the image's content):

- EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``): a camera that
  stored the sensor rows sideways shows the photo upright, and so must we, or the model
  trains on rotated objects the user never sees. An EXIF block too damaged to read is
  ignored with a warning: the pixels themselves are fine.
- 16-bit and 32-bit integer grayscale (``I;16*``, ``I``) is scaled from the 16-bit range
  to 8 bits (value / 257). Pillow's own ``convert`` clips at 255 instead, which turns
  almost every pixel of a 16-bit image white. ``I`` images come from 16-bit PNG/TIFF
  files in practice, so the same range is assumed; values outside it are clipped.
- Anything with transparency (``RGBA``, ``LA``, ``PA``, premultiplied modes, and ``P``,
  ``L`` or ``RGB`` images with a ``transparency`` key) is composited on white. Dropping
  alpha would expose whatever colour the invisible pixels happen to store (often black,
  sometimes leftover garbage from an editor), giving the model a background nobody
  drew; white is how viewers and product catalogues show transparent images, and it
  is the same for every file.
- ``CMYK``, ``YCbCr``, ``L``, ``1`` and opaque ``P`` use Pillow's standard conversion.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
BACKGROUND = (255, 255, 255)
"""Colour transparent pixels are composited on."""


class ImageDecodeError(OSError):
    """A file that is not a decodable image; the message names it and what failed.

    An ``OSError`` so code that already catches I/O failures (DataLoader error handling,
    ``except OSError``) keeps working.
    """


def load_rgb(source: str | os.PathLike | bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """Decode ``source`` (a path, bytes or binary file object) into an upright 8-bit RGB image.

    Every pixel is decoded here (truncated files fail now, not inside a transform), and
    the returned image owns its pixels, so the file can be closed. ``name`` is how errors
    refer to the file (a URI or path); it defaults to the path when one is given.
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        with warnings.catch_warnings():
            # Pillow warns (e.g. about palette transparency given as bytes); the result is right.
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(source) as image:
                image.load()
                return to_rgb(_upright(image, name))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{name}: refused as a possible decompression bomb ({err})") from err
    except Exception as err:  # Pillow plugins raise OSError, SyntaxError, ValueError, struct.error...
        raise ImageDecodeError(f"cannot decode {name}: {type(err).__name__}: {err}") from err


def _upright(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as err:  # a damaged EXIF block must not cost a valid picture
        log.warning("%s: cannot read its EXIF orientation (%s: %s); using the pixels as stored",
                    name, type(err).__name__, err)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image, following the rules in the module docstring."""
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        wide = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")  # uint8 2-D array: mode L
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "RGB":
        return image.copy()
    return image.convert("RGB")
