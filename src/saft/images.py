"""The project image: no command defaults to one nobody publishes.

Every task, predictor and TrainJob node runs the image docker/Dockerfile builds and the
user pushes (docs/images.md). Its name comes from ``--image`` or ``$SAFT_IMAGE``; the
reviewed snapshots name a placeholder no registry serves, so forgetting the image fails
at compile or deploy time, not as ImagePullBackOff on the cluster.
"""

from __future__ import annotations

import os

IMAGE_ENV = "SAFT_IMAGE"
SNAPSHOT_IMAGE = "registry.invalid/saft:snapshot"
"""The image the reviewed snapshots (pipelines/*/pipeline.yaml, components/*/component.yaml) and local runs name:
the .invalid domain is never served."""


def resolve_image(image: str | None) -> str:
    """``--image``, else ``$SAFT_IMAGE``; nothing publishes a default, so neither given is an error."""
    image = (image or os.environ.get(IMAGE_ENV, "")).strip()
    if not image:
        raise ValueError(f"no project image: pass --image REGISTRY/saft:TAG (the image docker/Dockerfile builds and you "
                         f"push, docs/images.md) or set {IMAGE_ENV}")
    if image == SNAPSHOT_IMAGE:
        raise ValueError(f"--image {SNAPSHOT_IMAGE} is the snapshots' placeholder, which no registry serves; pass the "
                         "image you pushed")
    return image
