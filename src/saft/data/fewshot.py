"""Deterministic k-shot splits and base/new class halves.

A few-shot result is only comparable across runs if every machine picks the same
images for a given (shots, seed). Instead of a random generator (whose stream can change
between library versions) each image gets a sort key ``sha256(version, seed, path)``;
a class's first ``shots`` images in that order form the training set and the next
``val_shots`` the validation set. The order depends only on the seed and the path, so
it does not change with the platform, the listing order, or the other classes, and
smaller shot counts are subsets of larger ones (1-shot is inside 2-shot is inside 4-shot).

Base/new halves follow the CoOp base-to-new protocol: of the class list in label order
(for ImageFolder roots, the sorted folder names) the first ceil(n/2) classes are *base*
and the rest *new*.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Literal, Sequence, TypeVar

from saft.data.manifest import (  # re-exported: the manifest is the few-shot output format
    LabelledPath,
    ManifestEntry,
    ManifestError,
    hash_entries,
    manifest_hash,
    read_manifest,
    write_manifest,
)

__all__ = [
    "FewShotError",
    "FewShotSplit",
    "ManifestEntry",
    "ManifestError",
    "few_shot_split",
    "hash_entries",
    "manifest_hash",
    "read_manifest",
    "sampling_orders",
    "select_few_shot",
    "shot_order",
    "split_base_new",
    "subsample_classes",
    "write_manifest",
]

ORDER_VERSION = "saft-fewshot-v1"

E = TypeVar("E", bound=LabelledPath)


class FewShotError(ValueError):
    """The requested split cannot be drawn (bad arguments, or classes with too few images)."""


@dataclass(frozen=True)
class FewShotSplit:
    """The images picked for one (shots, seed): disjoint train and val sets, sorted by path."""

    shots: int | None
    seed: int
    train: tuple
    val: tuple


def _order_key(seed: int, path: str) -> bytes:
    return hashlib.sha256(f"{ORDER_VERSION}\x00{seed}\x00{path}".encode("utf-8")).digest()


def shot_order(entries: Sequence[E], seed: int) -> list[E]:
    """The entries in their sampling order for ``seed`` (same on every machine)."""
    return sorted(entries, key=lambda entry: (_order_key(seed, entry.path), entry.path))


def _check_count(name: str, value: object, *, allow_none: bool, minimum: int) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expect = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise FewShotError(f"{name} must be {expect}, got {value!r}")


def select_few_shot(
    entries: Sequence[E],
    shots: int | None,
    seed: int,
    *,
    val_shots: int = 0,
    classes: Sequence[str] | None = None,
    allow_fewer: bool = False,
) -> FewShotSplit:
    """Pick ``shots`` training and ``val_shots`` validation images per class.

    ``shots=None`` takes every image for training. ``classes`` (the full class list)
    makes a class with no image an error instead of silently dropping it. A class with
    fewer than ``shots + val_shots`` images is an error unless ``allow_fewer``, in which
    case it contributes what it has (training first).
    """
    _check_count("shots", shots, allow_none=True, minimum=1)
    _check_count("val_shots", val_shots, allow_none=False, minimum=0)
    need = None if shots is None else shots + val_shots
    orders = sampling_orders(entries, seed, need=need, classes=classes, allow_fewer=allow_fewer)
    train: list[E] = []
    val: list[E] = []
    for ordered in orders.values():
        if shots is None:
            train.extend(ordered)
            continue
        train.extend(ordered[:shots])
        val.extend(ordered[shots : shots + val_shots])
    return few_shot_split(shots, seed, train, val)


def few_shot_split(shots: int | None, seed: int, train: Sequence[E], val: Sequence[E]) -> FewShotSplit:
    """A :class:`FewShotSplit` of the chosen entries, each set sorted by path."""
    by_path = lambda entry: entry.path  # noqa: E731
    return FewShotSplit(shots=shots, seed=seed, train=tuple(sorted(train, key=by_path)),
                        val=tuple(sorted(val, key=by_path)))


def sampling_orders(
    entries: Sequence[E],
    seed: int,
    *,
    need: int | None = None,
    classes: Sequence[str] | None = None,
    allow_fewer: bool = False,
) -> dict[str, list[E]]:
    """Each class's entries in their sampling order for ``seed``, classes sorted by name.

    A draw takes a class's images from the front of its order, so the first ``need``
    usable ones are its pick (:func:`select_few_shot`, and :mod:`saft.data.drawn`,
    which skips broken ones). Refuses, as :class:`FewShotError`, a path listed twice,
    a class of ``classes`` without images and, unless ``allow_fewer``, a class with
    fewer than ``need`` images.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FewShotError(f"seed must be an integer, got {seed!r}")
    by_class: dict[str, list[E]] = {}
    seen: set[str] = set()
    for entry in entries:
        if entry.path in seen:
            raise FewShotError(f"path {entry.path!r} is listed twice")
        seen.add(entry.path)
        by_class.setdefault(entry.class_name, []).append(entry)
    if classes is not None:
        empty = [name for name in classes if name not in by_class]
        if empty:
            raise FewShotError(
                f"{len(empty)} class(es) have no images: {', '.join(map(repr, empty[:10]))}; "
                "add images or remove the class from the class list"
            )
    if not by_class:
        raise FewShotError("no images to split")
    short = {name: len(items) for name, items in by_class.items() if need is not None and len(items) < need}
    if short and not allow_fewer:
        listed = ", ".join(f"{name!r} ({count})" for name, count in sorted(short.items())[:10])
        raise FewShotError(
            f"{len(short)} class(es) have fewer than {need} images (shots + val_shots): "
            f"{listed}; lower --shots or --val-shots (params.yaml: data.shots, data.val_shots)"
        )
    return {name: shot_order(by_class[name], seed) for name in sorted(by_class)}


def split_base_new(classes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(base, new): the first ceil(n/2) classes of the label-ordered list, and the rest."""
    names = list(classes)
    if len(set(names)) != len(names):
        raise FewShotError("class list has duplicate names")
    if len(names) < 2:
        raise FewShotError(f"base/new halves need at least 2 classes, got {len(names)}")
    middle = math.ceil(len(names) / 2)
    return names[:middle], names[middle:]


def subsample_classes(
    entries: Sequence[E],
    classes: Sequence[str],
    half: Literal["all", "base", "new"],
    *,
    relabel: bool = True,
) -> tuple[list[E], list[str]]:
    """Keep the entries of one half and return them with that half's class list.

    With ``relabel`` the labels become positions in the half's class list (0..m-1), as a
    classifier over only those classes expects; the class names stay unchanged.
    """
    if half == "all":
        kept = list(classes)
    elif half == "base":
        kept = split_base_new(classes)[0]
    elif half == "new":
        kept = split_base_new(classes)[1]
    else:
        raise FewShotError(f"half must be 'all', 'base' or 'new', got {half!r}")
    position = {name: index for index, name in enumerate(kept)}
    unknown = sorted({entry.class_name for entry in entries} - set(classes))
    if unknown:
        raise FewShotError(f"entries use classes missing from the class list: {', '.join(map(repr, unknown[:10]))}")
    selected: list[E] = []
    for entry in entries:
        if entry.class_name not in position:
            continue
        if relabel:
            entry = dataclasses.replace(entry, label=position[entry.class_name])  # type: ignore[type-var]
        selected.append(entry)
    return selected, kept
