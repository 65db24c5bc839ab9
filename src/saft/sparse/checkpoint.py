"""Training checkpoints: written atomically, checked against their recorded sha256 on load.

A checkpoint (``checkpoint.pt``, torch's zip format, tensors and plain values only) sits
beside its digest record (``checkpoint.sha256.json``). The record is written *before*
the checkpoint is renamed into place and keeps the digests of the last two checkpoints,
so whenever a run is killed, the checkpoint on disk matches one digest of the record; a
checkpoint that matches none was damaged after it was written (a flipped byte, a
truncated copy) and is refused with its path, never resumed from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from saft.io import DamagedArtifactError, atomic_path
from saft.models.loading import unsafe_pickle_reason

CHECKPOINT_NAME = "checkpoint.pt"
DIGEST_NAME = "checkpoint.sha256.json"
DIGEST_FORMAT = "saft-checkpoint-digests/1"
_KEEP = 2


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digests(folder: Path) -> dict[str, int]:
    path = folder / DIGEST_NAME
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        return {str(k): int(v) for k, v in doc["digests"].items()} if doc.get("format") == DIGEST_FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save(state)`` to ``path`` atomically, its digest recorded first (see the module's docstring)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        digest = file_sha256(tmp)
        kept = dict(sorted(_digests(path.parent).items(), key=lambda kv: kv[1])[-(_KEEP - 1):])
        kept[digest] = int(state.get("step", 0))
        with atomic_path(path.parent / DIGEST_NAME) as record:
            record.write_text(json.dumps({"format": DIGEST_FORMAT, "file": path.name, "digests": kept},
                                         indent=2, sort_keys=True) + "\n")


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`DamagedArtifactError` naming ``path`` when its bytes match no recorded digest.

    A checkpoint without a record (written by an older version) is accepted as it is.
    """
    path = Path(path)
    recorded = _digests(path.parent)
    if not recorded:
        return
    digest = file_sha256(path)
    if digest not in recorded:
        raise DamagedArtifactError(
            f"{path}: damaged checkpoint: its sha256 {digest[:12]}... matches none recorded in "
            f"{path.parent / DIGEST_NAME} when it was written; delete the folder {path.parent} to start fresh "
            "(or restore the checkpoint from a copy)")


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict:
    """The verified state of a checkpoint (tensors and plain values only: pickle runs code on load)."""
    path = Path(path)
    if not mmap:
        verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # pickle errors come in many types
        raise ValueError(
            f"{path}: checkpoint cannot be read safely ({unsafe_pickle_reason(exc)}); it holds "
            "something other than tensors and plain values, or is damaged. Delete it to start fresh."
        ) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: not a SAFT training checkpoint; delete it to start fresh")
    return state


def checkpoint_step(folder: str | Path) -> int:
    """The step of the checkpoint in ``folder`` (0: none); memory-mapped, so cheap for big ones."""
    path = Path(folder) / CHECKPOINT_NAME
    return int(read_checkpoint(path, mmap=True)["step"]) if path.is_file() else 0
