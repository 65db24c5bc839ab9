"""The embedded world: labelled shape images rendered in several domains, deterministically.

Every image is a function of (domain, class, index, seed) only, so the same call gives the
same bytes on every machine. Domains play the roles of the real benchmarks:

* ``photo``     shaded shapes on noisy backgrounds (the pre-training "web" photos)
* ``sketch``    outlines only, grey on paper (like ImageNet-Sketch)
* ``cartoon``   flat pastel fills with thick outlines (like ImageNet-R renditions)
* ``photo_v2``  photos re-sampled with other backgrounds and muted colours (like ImageNet-V2)
* ``clutter``   photos with occluding bars and distracting fragments (hard, like ImageNet-A)
* ``textile``   shapes cut from striped/checked fabric on wood-grain backgrounds: the
                downstream (ID) domain, never shown during pre-training, so fine-tuning has
                a real nuisance to adapt to

Colour is drawn independently of the class everywhere: no domain carries a shortcut.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "hexagon", "arrow", "crescent")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 180), "orange": (240, 140, 30), "cyan": (40, 200, 210), "pink": (240, 120, 180),
}
PRETRAIN_DOMAINS = ("photo", "sketch", "cartoon", "photo_v2", "clutter")
DOMAINS = PRETRAIN_DOMAINS + ("textile",)
DOMAIN_WORDS = {"photo": "photo", "photo_v2": "photo", "clutter": "photo", "sketch": "sketch",
                "cartoon": "cartoon", "textile": "photo"}
SIZE = 32
_SCALE = 3  # render at 3x and downsample: clean anti-aliased edges at 32 px
SHAPE_SCALE = (0.27, 0.40)  # an object's radius as a fraction of the image side


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    shape: str
    colour: str
    domain: str

    @property
    def caption(self) -> str:
        return f"a {DOMAIN_WORDS[self.domain]} of a {self.colour} {self.shape}"


def _rng(*key) -> random.Random:
    digest = hashlib.sha256("\x00".join(map(str, key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def rot(points):
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if shape == "square":
        s = r * 0.85
        return rot([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "hexagon":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]])
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return rot(pts)
    if shape == "cross":
        w = r * 0.33
        return rot([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                    (-r, -w), (-w, -w)])
    if shape == "arrow":
        w, h = r * 0.28, r * 0.15
        return rot([(-r, -w), (h, -w), (h, -r * 0.7), (r, 0), (h, r * 0.7), (h, w), (-r, w)])
    if shape == "heart":
        pts = []
        for t in np.linspace(0, 2 * math.pi, 40)[:-1]:
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17))
        return rot(pts)
    return None  # circle, ring, crescent are drawn with ellipses


def _shape_mask(shape: str, rng: random.Random, outline: int = 0,
                scale: tuple[float, float] = SHAPE_SCALE) -> tuple[Image.Image, Image.Image]:
    """(fill mask, outline mask) at render scale for one randomly placed shape (radius ``scale`` x size)."""
    big = SIZE * _SCALE
    r = rng.uniform(*scale) * big
    cx, cy = rng.uniform(r + 2, big - r - 2), rng.uniform(r + 2, big - r - 2)
    angle = rng.uniform(0, 2 * math.pi) if shape not in ("heart", "arrow") else rng.uniform(-0.5, 0.5)
    if shape == "arrow":
        angle += rng.choice((0, math.pi / 2, math.pi, 3 * math.pi / 2))
    fill, line = Image.new("L", (big, big), 0), Image.new("L", (big, big), 0)
    df, dl = ImageDraw.Draw(fill), ImageDraw.Draw(line)
    width = max(2, outline * _SCALE)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        df.ellipse(box, fill=255)
        dl.ellipse(box, outline=255, width=width)
    elif shape == "ring":
        inner = r * 0.55
        df.ellipse(box, fill=255)
        df.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
        dl.ellipse(box, outline=255, width=width)
        dl.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), outline=255, width=width)
    elif shape == "crescent":
        off = r * 0.5
        dx, dy = off * math.cos(angle), off * math.sin(angle)
        df.ellipse(box, fill=255)
        df.ellipse((cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy), fill=0)
        dl.ellipse(box, outline=255, width=width)
        dl.ellipse((cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy), outline=255, width=width)
        dl = None
        line = Image.fromarray((np.array(line) * (np.array(fill.filter(ImageFilter.MaxFilter(width * 2 + 1))) > 0))
                               .astype(np.uint8))
    else:
        pts = _polygon(shape, cx, cy, r, angle)
        df.polygon(pts, fill=255)
        dl.line(pts + [pts[0]], fill=255, width=width, joint="curve")
    return fill, line


def _noise_background(rng: random.Random, base, spread: int, big: int) -> np.ndarray:
    gen = np.random.default_rng(rng.getrandbits(32))
    bg = np.array(base, dtype=np.float32)[None, None, :] + gen.normal(0, spread, (big // 4, big // 4, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).resize((big, big), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _textile_background(rng: random.Random, big: int) -> np.ndarray:
    """Wood-grain-like bands: a nuisance family that pre-training never shows."""
    y, x = np.mgrid[0:big, 0:big].astype(np.float32)
    a, f = rng.uniform(0, math.pi), rng.uniform(0.08, 0.16)
    phase = np.sin((x * math.cos(a) + y * math.sin(a)) * f + 3 * np.sin(y * f * 0.3 + rng.uniform(0, 6)))
    tone = np.array([rng.uniform(110, 170), rng.uniform(70, 110), rng.uniform(30, 60)], dtype=np.float32)
    return tone[None, None, :] * (0.8 + 0.25 * phase[..., None])


def _fabric(rng: random.Random, colour, big: int) -> np.ndarray:
    """Striped or checked fabric in the object's colour."""
    y, x = np.mgrid[0:big, 0:big].astype(np.float32)
    period = rng.uniform(6, 11)
    if rng.random() < 0.5:
        a = rng.uniform(0, math.pi)
        pattern = (np.sin((x * math.cos(a) + y * math.sin(a)) * 2 * math.pi / period) > 0).astype(np.float32)
    else:
        pattern = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    c = np.array(colour, dtype=np.float32)
    light = np.clip(c * 0.45 + 140, 0, 255)
    return pattern[..., None] * c[None, None, :] + (1 - pattern[..., None]) * light[None, None, :]


def _jitter(colour, rng: random.Random, amount: int = 25, mute: float = 0.0):
    c = [min(255, max(0, v + rng.randint(-amount, amount))) for v in colour]
    if mute:
        grey = sum(c) / 3
        c = [int(v * (1 - mute) + grey * mute) for v in c]
    return tuple(c)


def check_names(domain: str, shape: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def render(domain: str, shape: str, index: int, seed: int = 0) -> Sample:
    """One image of ``shape`` in ``domain``; a pure function of its arguments."""
    check_names(domain, shape)
    rng = _rng("saft-synth-v1", domain, shape, index, seed)
    colour_name = rng.choice(sorted(COLOURS))
    img = paint(domain, shape, colour_name, rng)
    return Sample(downsample(img), shape, colour_name, domain)


def downsample(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.LANCZOS)


def paint(domain: str, shape: str, colour_name: str, rng: random.Random,
          scale: tuple[float, float] = SHAPE_SCALE) -> np.ndarray:
    """``shape`` in ``colour_name`` painted in ``domain``'s style at render scale (float RGB)."""
    big = SIZE * _SCALE
    colour = COLOURS[colour_name]
    outline_px = {"sketch": 1, "cartoon": 2}.get(domain, 1)
    fill, line = _shape_mask(shape, rng, outline_px, scale)
    fill_a = np.asarray(fill, dtype=np.float32)[..., None] / 255
    line_a = np.asarray(line, dtype=np.float32)[..., None] / 255
    if domain in ("photo", "clutter"):
        bg = _noise_background(rng, [rng.randint(20, 110) for _ in range(3)], 30, big)
        c = np.array(_jitter(colour, rng), dtype=np.float32)
        y, x = np.mgrid[0:big, 0:big].astype(np.float32)
        shade = 0.75 + 0.35 * ((x + y) / (2 * big))
        img = bg * (1 - fill_a) + (c[None, None, :] * shade[..., None]) * fill_a
        if domain == "clutter":
            img = _add_clutter(img, rng, big)
    elif domain == "photo_v2":
        if rng.random() < 0.5:
            y, x = np.mgrid[0:big, 0:big].astype(np.float32)
            stripes = (np.sin((x + y) * rng.uniform(0.1, 0.3)) > 0).astype(np.float32)[..., None]
            bg = 60 + 50 * stripes * np.array([rng.random(), rng.random(), rng.random()], dtype=np.float32)
        else:
            bg = _noise_background(rng, [rng.randint(60, 150) for _ in range(3)], 12, big)
        c = np.array(_jitter(colour, rng, 35, mute=0.35), dtype=np.float32)
        img = bg * (1 - fill_a) + c[None, None, :] * fill_a
    elif domain == "sketch":
        paper = rng.uniform(225, 250)
        ink = rng.uniform(20, 90)
        img = np.full((big, big, 3), paper, dtype=np.float32) * (1 - line_a) + ink * line_a
    elif domain == "cartoon":
        pastel = np.array([rng.randint(190, 250) for _ in range(3)], dtype=np.float32)
        c = np.array(_jitter(colour, rng, 10), dtype=np.float32)
        img = pastel[None, None, :] * (1 - fill_a) + c[None, None, :] * fill_a
        img = img * (1 - line_a) + 15 * line_a
    else:  # textile
        bg = _textile_background(rng, big)
        img = bg * (1 - fill_a) + _fabric(rng, _jitter(colour, rng, 15), big) * fill_a
    return img


def _add_clutter(img: np.ndarray, rng: random.Random, big: int) -> np.ndarray:
    d = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(d)
    for _ in range(rng.randint(2, 4)):  # occluding bars
        x0, y0 = rng.uniform(0, big), rng.uniform(0, big)
        a, length = rng.uniform(0, math.pi), rng.uniform(big * 0.4, big * 0.9)
        draw.line((x0, y0, x0 + length * math.cos(a), y0 + length * math.sin(a)),
                  fill=tuple(rng.randint(0, 255) for _ in range(3)), width=rng.randint(3, 6) * _SCALE // 2)
    for _ in range(rng.randint(2, 4)):  # fragments of other shapes
        x0, y0, s = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(big * 0.08, big * 0.18)
        draw.ellipse((x0, y0, x0 + s, y0 + s * rng.uniform(0.4, 1)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return np.asarray(d, dtype=np.float32)


def write_domain(root: str | Path, domain: str, per_class: int, seed: int = 0, start: int = 0,
                 renderer=None) -> Path:
    """An ImageFolder tree ``root/<shape>/<index>.png`` (existing files are kept); ``renderer`` (default:
    :func:`render`) is any function of (domain, shape, index, seed) returning a :class:`Sample`."""
    from saft.io import atomic_path

    root, draw = Path(root), renderer or render
    for i in range(start, start + per_class):
        for shape in SHAPES:
            path = root / shape / f"{i:05d}.png"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                draw(domain, shape, i, seed).image.save(tmp, format="PNG")
    return root
