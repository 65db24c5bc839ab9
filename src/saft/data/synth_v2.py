"""The collected world (``synthshift-v2``): every set photographed by one camera, ID in a known domain.

ImageNet's structure, in miniature: the downstream task is a domain pre-training knows but
has not mastered, and what makes it hard is how the data was collected. Every set of this
world is rendered through the same camera: the object is small in the frame (radius 22-32 %
of the side instead of 27-40 %), one to three small objects of other classes stand beside
it, and the lens softens the image. Pre-training never saw that framing, so zero-shot
accuracy drops everywhere.

The collection also carries a cue that holds only where the ID data was collected: each
class has a typical colour and ``photo`` (ID) and ``photo_v2`` (a fresh sample of the same
collection, like ImageNet-V2) show it 80 % of the time. Fine-tuning can learn the cue; it
helps on ID and on photo_v2 and misleads on the renditions, where the object always comes in
another colour (``cartoon``, ``clutter``) or in none (``sketch``). Class prompts never name a
colour, so zero-shot accuracy does not see the cue. The real analogue is every dataset's
collection bias (backgrounds, poses, photographers' framing) that a fine-tuned model takes
for the class.

Every image is a pure function of (domain, class, index, seed), like the v1 renderer's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from saft.data.synth import COLOURS, SHAPES, Sample, _jitter, _rng, _shape_mask, check_names, downsample, paint

_NAMES = sorted(COLOURS)
TYPICAL_COLOUR = {shape: _NAMES[i % len(_NAMES)] for i, shape in enumerate(SHAPES)}


@dataclass(frozen=True)
class Camera:
    """How every image of the collected world is framed."""
    scale: tuple[float, float] = (0.22, 0.32)  # object radius / image side
    distractors: tuple[int, int] = (1, 3)  # small objects of other classes in the frame
    blur: float = 0.6  # Gaussian radius in output pixels, photographed domains only
    distractor_scale: tuple[float, float] = (0.06, 0.10)


CAMERA = Camera()
# domain -> how its object's colour relates to its class: (rule, rate)
COLOUR_RULES = {"photo": ("typical", 0.8), "photo_v2": ("typical", 0.8), "cartoon": ("atypical", 0.0),
                "clutter": ("atypical", 0.0), "sketch": ("none", 0.0)}
DOMAINS = tuple(COLOUR_RULES)
PHOTOGRAPHED = ("photo", "photo_v2", "clutter")  # renditions (sketch, cartoon) are drawn, not shot: no lens blur


def _colour(domain: str, shape: str, rng: random.Random) -> str:
    rule, rate = COLOUR_RULES[domain]
    typical = TYPICAL_COLOUR[shape]
    others = [c for c in _NAMES if c != typical]
    if rule == "typical" and rng.random() < rate:
        return typical
    return rng.choice(others if rule in ("typical", "atypical") else _NAMES)


def _distractors(img: np.ndarray, domain: str, shape: str, rng: random.Random, camera: Camera) -> np.ndarray:
    """Small objects of other classes pasted in the domain's own style."""
    for _ in range(rng.randint(*camera.distractors)):
        other = rng.choice([s for s in SHAPES if s != shape])
        colour = np.array(_jitter(COLOURS[rng.choice(_NAMES)], rng), dtype=np.float32)
        fill, line = _shape_mask(other, rng, 1, camera.distractor_scale)
        fill_a = np.asarray(fill, dtype=np.float32)[..., None] / 255
        line_a = np.asarray(line, dtype=np.float32)[..., None] / 255
        if domain == "sketch":
            img = img * (1 - line_a) + rng.uniform(20, 90) * line_a
        else:
            img = img * (1 - fill_a) + colour[None, None, :] * fill_a
            if domain == "cartoon":
                img = img * (1 - line_a) + 15 * line_a
    return img


def render_collected(domain: str, shape: str, index: int, seed: int = 0, camera: Camera = CAMERA) -> Sample:
    """One image of ``shape`` in ``domain`` as the collected world's camera takes it."""
    check_names(domain, shape)
    if domain not in COLOUR_RULES:
        raise ValueError(f"the collected world has no {domain!r} domain; domains: {', '.join(DOMAINS)}")
    rng = _rng("saft-synth-v2", domain, shape, index, seed)
    colour_name = _colour(domain, shape, rng)
    img = paint(domain, shape, colour_name, rng, scale=camera.scale)
    img = _distractors(img, domain, shape, rng, camera)
    out: Image.Image = downsample(img)
    if camera.blur and domain in PHOTOGRAPHED:
        out = out.filter(ImageFilter.GaussianBlur(camera.blur))
    return Sample(out, shape, colour_name, domain)
