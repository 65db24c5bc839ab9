"""Reading a prepared data folder (the output of ``saft data prepare``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from saft.data.manifest import manifest_hash
from saft.data.prepare import CLASSES_FILE, RECORD_FILE, TEMPLATES_FILE, TRAIN_FILE, TRAIN_TEMPLATES_FILE, VAL_FILE

PROMPT_SETS = ("train", "eval")


class PreparedDataError(ValueError):
    """A prepared data folder is missing a file or does not hold what the step needs."""


@dataclass(frozen=True)
class PreparedData:
    folder: Path
    root: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    record: dict
    train_templates: tuple[str, ...] = ()

    @classmethod
    def open(cls, folder: str | Path, root: str | None = None) -> "PreparedData":
        folder = Path(folder)
        missing = [n for n in (RECORD_FILE, CLASSES_FILE, TEMPLATES_FILE, TRAIN_FILE) if not (folder / n).is_file()]
        if missing:
            raise PreparedDataError(
                f"{folder}: not a prepared data folder (missing {', '.join(missing)}); "
                "create it with `saft data prepare ROOT --out FOLDER`"
            )
        try:
            record = json.loads((folder / RECORD_FILE).read_text())
            classes = tuple(json.loads((folder / CLASSES_FILE).read_text()))
            templates = tuple(json.loads((folder / TEMPLATES_FILE).read_text()))
            train_file = folder / TRAIN_TEMPLATES_FILE
            # Folders prepared before training prompts were separate trained with the evaluation set.
            train_templates = tuple(json.loads(train_file.read_text())) if train_file.is_file() else templates
        except json.JSONDecodeError as exc:
            raise PreparedDataError(f"{folder}: a JSON file is damaged ({exc}); prepare the folder again") from exc
        return cls(folder, root or record.get("root", ""), classes, templates, record, train_templates)

    def prompt_templates(self, prompt_set: str) -> tuple[str, ...]:
        """``train``: the training prompt set (scoring, fine-tuning); ``eval``: the evaluation ensemble."""
        if prompt_set not in PROMPT_SETS:
            raise PreparedDataError(f"prompt set must be one of {', '.join(PROMPT_SETS)}, got {prompt_set!r}")
        return self.train_templates if prompt_set == "train" else self.templates

    def manifest(self, split: str = "train") -> Path:
        path = self.folder / (TRAIN_FILE if split == "train" else VAL_FILE)
        if not path.is_file():
            hint = " (prepare with --val-shots K to get one)" if split == "val" else ""
            raise PreparedDataError(f"{self.folder}: no {split} manifest{hint}")
        return path

    def manifest_hash(self, split: str = "train") -> str:
        return manifest_hash(self.manifest(split))

    def dataset(self, transform: Callable, split: str = "train", skip_corrupt: bool = False):
        from saft.data.dataset import ManifestDataset

        return ManifestDataset(self.manifest(split), self.root, transform, skip_corrupt=skip_corrupt,
                               classes=self.classes)
