"""``DatasetAdapter``: what the pipeline needs to know about one dataset.

An adapter answers, from its spec: how to index a root (local path or ``s3://``) into
labelled images, what the classes are called, which prompts describe them, whether the
set may be trained on, and, for 200-class sets, which of the 1000 ImageNet classes they
cover. Steps ask the adapter instead of assuming an ImageFolder tree, so the same prepare
and evaluate code serves ImageNet, its shifted variants and the CoOp datasets.
"""

from __future__ import annotations

import os

from saft.data.adapters.aircraft_txt import aircraft_class_names, scan_aircraft_txt
from saft.data.adapters.errors import AdapterError, EvalOnlyError
from saft.data.adapters.folders import folder_class_names, scan_folders
from saft.data.adapters.sources import ClassSpace, load_class_space, load_subset, resolve_templates
from saft.data.adapters.spec import DEFAULT_TEMPLATE_SET, DatasetSpec
from saft.data.adapters.split_json import scan_split_json, split_json_class_names
from saft.data.imagefolder import ImageFolderIndex
from saft.data.storage import Storage, open_storage

Root = str | os.PathLike | Storage


TRAIN_TEMPLATE_SET = "train"
FALLBACK_TRAIN_TEMPLATE = "a photo of a {}."


class DatasetAdapter:
    """One dataset, as described by its spec; cheap to build, reads data only when asked.

    Fixed class lists (ImageNet and its variants) come from installed packages and are
    loaded on first use; root-dependent ones (CoOp split files, FGVC-Aircraft's variant
    list, folder names) are read from the root given to :meth:`class_names` or :meth:`scan`.
    """

    def __init__(self, spec: DatasetSpec, template_set: str = DEFAULT_TEMPLATE_SET) -> None:
        if template_set not in spec.templates:
            raise AdapterError(
                f"dataset {spec.name!r} has no template set {template_set!r}; "
                f"available: {', '.join(sorted(spec.templates))}"
            )
        self.spec = spec
        self.template_set = template_set

    def __repr__(self) -> str:
        return f"DatasetAdapter({self.name!r}, layout={self.spec.layout!r}, templates={self.template_set!r})"

    # --- identity -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def title(self) -> str:
        return self.spec.title

    @property
    def eval_only(self) -> bool:
        """True for sets that only measure robustness (ImageNet-V2, -Sketch, -A, -R)."""
        return self.spec.eval_only

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.spec.splits)

    @property
    def default_split(self) -> str:
        return self.spec.default_split

    def check_trainable(self) -> None:
        """Raise :class:`EvalOnlyError` for evaluation-only sets.

        Training on a distribution-shift benchmark would make its accuracy an
        in-distribution number, so these sets refuse to be used as training data.
        """
        if self.eval_only:
            raise EvalOnlyError(
                f"dataset {self.name!r} ({self.title}) is evaluation-only: it measures accuracy under "
                "distribution shift and must not be trained on. Train on 'imagenet' (or another "
                "trainable dataset) and use this one in an evaluation suite."
            )

    # --- prompts ------------------------------------------------------------------------

    @property
    def template_sets(self) -> tuple[str, ...]:
        """Names of the prompt sets the spec offers (``default`` first)."""
        return (DEFAULT_TEMPLATE_SET,) + tuple(sorted(set(self.spec.templates) - {DEFAULT_TEMPLATE_SET}))

    @property
    def templates(self) -> list[str]:
        """The prompt templates of the chosen set, each with one ``{}`` for the class name."""
        where = f"{self.spec.source}: templates '{self.template_set}'"
        return list(resolve_templates(self.spec.templates[self.template_set], where))

    @property
    def train_templates(self) -> list[str]:
        """The prompts scoring and training use: the spec's ``train`` set, else a one-prompt default set,
        else CLIP's single prompt ``a photo of a {}.``.

        Training re-encodes its prompts with gradients at every step, so it uses one hand-crafted
        template per dataset (as the CoOp protocol and the SAFT paper do); evaluation keeps the
        ensemble of the chosen set (ImageNet: CLIP's 80 prompts).
        """
        if TRAIN_TEMPLATE_SET in self.spec.templates:
            where = f"{self.spec.source}: templates '{TRAIN_TEMPLATE_SET}'"
            return list(resolve_templates(self.spec.templates[TRAIN_TEMPLATE_SET], where))
        default = self.with_templates(DEFAULT_TEMPLATE_SET).templates
        return default if len(default) == 1 else [FALLBACK_TRAIN_TEMPLATE]

    def with_templates(self, template_set: str) -> DatasetAdapter:
        """The same dataset with another prompt set (e.g. ImageNet's short ``simple`` set)."""
        return DatasetAdapter(self.spec, template_set)

    # --- classes ------------------------------------------------------------------------

    @property
    def has_fixed_classes(self) -> bool:
        """True when class names come from the spec's sources, so no root is needed to know them."""
        return self.spec.classes.source == "packages"

    def _class_space(self) -> ClassSpace:
        return load_class_space(self.spec.classes)

    def class_names(self, root: Root | None = None) -> list[str]:
        """Class names in label order (position = label).

        For ImageNet-family sets these are the 1000 ImageNet names (also for the 200-class
        sets, whose labels live in the 1000-class space). Other sets read them from the
        dataset itself, so ``root`` is required there.
        """
        if self.has_fixed_classes:
            return list(self._class_space().names)
        if root is None:
            raise AdapterError(
                f"the class names of {self.name!r} are read from the dataset ({self._class_source()}); "
                "pass its root: class_names(root)"
            )
        storage = open_storage(root)
        layout = self.spec.layout
        if layout == "split-json":
            return list(split_json_class_names(storage, self.spec))
        if layout == "aircraft-txt":
            return list(aircraft_class_names(storage, self.spec))
        return list(folder_class_names(storage, self.spec))

    def _class_source(self) -> str:
        source = self.spec.classes.source
        if source == "split-file":
            return f"its {self.spec.split_file}"
        if source == "lines-file":
            return f"its {self.spec.classes.file}"
        return "its folder names"

    @property
    def imagenet_subset(self) -> list[int] | None:
        """Sorted labels (0..999) of the ImageNet classes a 200-class set covers, else None.

        Evaluation must restrict the classifier to these columns (take the argmax over
        ``logits[:, imagenet_subset]`` and map back through this list), as the ImageNet-A/-R
        protocol does; scoring over all 1000 classes would count confusions with classes
        the set cannot contain.
        """
        if self.spec.subset is None:
            return None
        return list(load_subset(self.spec.subset, self.spec.classes))

    # --- indexing -----------------------------------------------------------------------

    def scan(self, root: Root, split: str | None = None, *, check_files: bool = True) -> ImageFolderIndex:
        """Index ``split`` (default: the spec's default split) of a root, local or ``s3://``.

        Returns an :class:`~saft.data.ImageFolderIndex`: ``classes`` in label order and
        entries with the image path relative to ``root``, the label and the class name.
        With ``check_files`` (layouts that list images in index files) every listed image
        must exist under the root.
        """
        split = self.default_split if split is None else split
        if split not in self.spec.splits:
            extra = " (it is evaluation-only)" if self.eval_only else ""
            raise AdapterError(
                f"dataset {self.name!r} has no split {split!r}{extra}; its splits: {', '.join(self.splits)}"
            )
        storage = open_storage(root)
        layout = self.spec.layout
        if layout == "split-json":
            return scan_split_json(storage, self.spec, split, check_files=check_files)
        if layout == "aircraft-txt":
            return scan_aircraft_txt(storage, self.spec, split, check_files=check_files)
        space = self._class_space() if self.has_fixed_classes else None
        subset = load_subset(self.spec.subset, self.spec.classes) if self.spec.subset is not None else None
        return scan_folders(storage, self.spec, split, space, subset)
