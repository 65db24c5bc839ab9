"""A torch Dataset over a manifest and a storage root.

Training and evaluation read exactly the files a manifest names, verified against
the recorded sha256, so a model is always trained on the bytes its data version says.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset

from saft.data.images import ImageDecodeError, load_rgb
from saft.data.manifest import ManifestEntry, check_class_names, manifest_classes, read_manifest
from saft.data.storage import LocalStorage, Storage, open_storage
from saft.data.validate import skip_corrupt as drop_broken_entries
from saft.data.validate import validate_root

log = logging.getLogger(__name__)


class ManifestDataset(Dataset):
    """``(transform(image), label)`` pairs for the entries of a manifest.

    ``transform`` maps an RGB ``PIL.Image`` to a tensor (e.g. an open_clip preprocess).
    With ``skip_corrupt=True`` every file is checked once up front and broken ones are
    dropped with a logged count (see :func:`saft.data.validate.skip_corrupt`); otherwise
    a broken file raises when it is read, naming the file. ``verify_hash=False`` skips
    the per-read sha256 check of local files when their integrity is guaranteed elsewhere
    (S3 blobs are always checked: the hash is how the cache finds them). ``classes`` (label
    order, e.g. ``classes.json``) makes the manifest's class names be checked against the
    list prompts are built from (see :func:`saft.data.manifest.check_class_names`).
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Sequence[ManifestEntry],
        root: str | os.PathLike | Storage,
        transform: Callable[[Image.Image], Any],
        *,
        skip_corrupt: bool = False,
        verify_hash: bool = True,
        classes: Sequence[str] | None = None,
    ) -> None:
        if isinstance(manifest, (str, os.PathLike)):
            self.source = str(manifest)
            entries = read_manifest(manifest)
        else:
            self.source = "<entries>"
            entries = list(manifest)
        if classes is not None:  # before any file is read: a mismatch is not a data problem to skip
            check_class_names(entries, classes, self.source)
        self.storage = open_storage(root)
        self.transform = transform
        self.verify_hash = verify_hash
        if skip_corrupt:
            report = validate_root(self.storage, entries, keep=True)  # training reads these blobs next
            entries = drop_broken_entries(entries, report, logger=log)
        self.entries: list[ManifestEntry] = entries
        self.class_names: dict[int, str] = manifest_classes(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        entry = self.entries[index]
        image = self.load_image(entry)
        return self.transform(image), entry.label

    def load_image(self, entry: ManifestEntry) -> Image.Image:
        """The entry's image as upright RGB, fully decoded (see :func:`saft.data.images.load_rgb`);
        errors name the manifest and the file."""
        # Remote blobs are always looked up by their sha256 (it is the cache key); the
        # switch only spares re-hashing local files.
        check = self.verify_hash or not isinstance(self.storage, LocalStorage)
        path: Path = self.storage.fetch(entry.path, entry.sha256 if check else None)
        try:
            return load_rgb(path, self.storage.uri_for(entry.path))
        except ImageDecodeError as err:
            raise ImageDecodeError(
                f"{err} (listed in {self.source}); run validation or use skip_corrupt=True"
            ) from err
