"""``saft evaluate --suite imagenet-shifts`` end to end, on a data root in the suite's default folders.

The fixture root holds a few real wnids (label indices for ImageNet-V2) per dataset, each
with two tiny images, in the folders ``saft.eval.suites.DEFAULT_FOLDERS`` names. The
ImageNet-A/-R images are picked so that scoring them over all 1000 classes would give 0%
and scoring them over the set's 200 classes 100%: each image's best class overall lies
outside the subset and it is filed under its best class within the subset. The records
of those two sets are then compared with an explicit 200-way head built in the test.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset

from saft.cli import main
from saft.data.adapters import get_adapter
from saft.eval import build_head, evaluate_head
from saft.eval.suites import DEFAULT_FOLDERS
from saft.models import load_model

MODEL = "saft-tiny-vit"
TENCH, GOLDFISH, TOILET_PAPER = "n01440764", "n01443537", "n15075141"  # labels 0, 1, 999
SUBSET_SETS = ("imagenet-a", "imagenet-r")
MARGIN = 1e-3  # cosine margin that keeps a pick stable under float noise between head builds
CANDIDATES = 240
ROLES = {"imagenet": "id", "imagenet-v2": "ood", "imagenet-sketch": "ood", "imagenet-a": "ood", "imagenet-r": "ood",
         "imagenet@a-classes": "id_subset", "imagenet@r-classes": "id_subset"}

pytestmark = pytest.mark.slow


def _candidate(number: int) -> Image.Image:
    """A 16x16 image of one of three kinds (flat colour, gradient, noise) so predictions vary."""
    rng = np.random.default_rng(number)
    kind = number % 3
    if kind == 0:
        pixels = np.broadcast_to(rng.integers(0, 256, 3), (16, 16, 3))
    elif kind == 1:
        ramp = np.linspace(0.0, 1.0, 16)
        colour = rng.integers(0, 256, 3)
        pixels = np.stack([np.outer(ramp, np.ones(16)) * colour[0], np.outer(np.ones(16), ramp) * colour[1],
                           np.full((16, 16), colour[2])], axis=-1)
    else:
        pixels = rng.integers(0, 256, (16, 16, 3))
    return Image.fromarray(np.ascontiguousarray(pixels).astype(np.uint8))


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")  # lossless: the pipeline decodes exactly the pixels chosen here


def _features(loaded, images: list[Image.Image]) -> torch.Tensor:
    with torch.inference_mode():
        batch = torch.stack([loaded.preprocess(image.convert("RGB")) for image in images])
        return F.normalize(loaded.model.encode_image(batch).float(), dim=-1)


def _pick_subset_images(logits: torch.Tensor, subset: list[int]) -> dict[int, list[int]]:
    """Subset label -> two candidate indices whose restricted and full predictions disagree clearly.

    A candidate qualifies when its best class overall is outside ``subset`` and both that
    choice and its best class within ``subset`` win by ``MARGIN``; it is filed under the
    latter. Two labels with two candidates each are returned.
    """
    columns = torch.tensor(subset)
    inside = logits[:, columns].topk(2, dim=-1)
    best_overall = logits.max(dim=-1)
    qualifies = (
        ~torch.isin(best_overall.indices, columns)
        & (inside.values[:, 0] - inside.values[:, 1] > MARGIN)
        & (best_overall.values - inside.values[:, 0] > MARGIN)
    )
    by_label: dict[int, list[int]] = {}
    for index in torch.nonzero(qualifies).flatten().tolist():
        by_label.setdefault(subset[int(inside.indices[index, 0])], []).append(index)
    picked = {label: found[:2] for label, found in sorted(by_label.items(), key=lambda kv: -len(kv[1]))
              if len(found) >= 2}
    if len(picked) < 2:
        pytest.fail(f"only {len(picked)} subset class(es) have 2 qualifying images among {CANDIDATES} candidates; "
                    "raise CANDIDATES")
    return dict(list(picked.items())[:2])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The data root, and for ImageNet-A/-R the (image, label) pairs filed there."""
    data_root = tmp_path_factory.mktemp("data")
    imagenet = get_adapter("imagenet", templates="simple")
    names = imagenet.class_names()
    wnid_of = sorted(resources.files("timm.data").joinpath("_info", "imagenet_synsets.txt").read_text().split())
    loaded = load_model(MODEL)
    full_head = build_head(loaded.model, loaded.tokenizer, names, imagenet.templates, classes_per_batch=len(names))

    number = 0

    def files(folder: Path, classes: list[str]) -> None:
        nonlocal number
        for name in classes:
            for _ in range(2):
                _save(_candidate(10_000 + number), folder / name / f"img_{number:04d}.png")
                number += 1

    files(data_root / DEFAULT_FOLDERS["imagenet"] / "val", [TENCH, TOILET_PAPER])
    files(data_root / DEFAULT_FOLDERS["imagenet-v2"] / "imagenetv2-matched-frequency-format-val", ["0", "999"])
    files(data_root / DEFAULT_FOLDERS["imagenet-sketch"] / "sketch", [GOLDFISH, TENCH])

    candidates = [_candidate(i) for i in range(CANDIDATES)]
    logits = _features(loaded, candidates) @ full_head.t()
    filed: dict[str, list[tuple[Image.Image, int]]] = {}
    for name in SUBSET_SETS:
        adapter = get_adapter(name)
        picked = _pick_subset_images(logits, adapter.imagenet_subset or [])
        folder = data_root / DEFAULT_FOLDERS[name] / name  # e.g. imagenet-adversarial/imagenet-a/<wnid>/
        filed[name] = []
        for label, indices in picked.items():
            for index in indices:
                _save(candidates[index], folder / wnid_of[label] / f"cand_{index:04d}.png")
                # the same picture in ImageNet val: the id_subset entries score it on the set's classes
                _save(candidates[index], data_root / DEFAULT_FOLDERS["imagenet"] / "val" / wnid_of[label]
                      / f"{name}_{index:04d}.png")
                filed[name].append((candidates[index], label))
    return {"root": data_root, "loaded": loaded, "names": names, "templates": imagenet.templates,
            "full_head": full_head, "filed": filed}


def test_imagenet_shifts_suite_on_default_folders(world: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main(["evaluate", "--suite", "imagenet-shifts", "--data-root", str(world["root"]), "--model", MODEL,
                 "--templates", "simple", "--out", str(out), "--batch-size", "8"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "metrics.json").read_text())
    records = {r["dataset"]: r for r in doc["records"]}
    assert len(doc["records"]) == len(ROLES) and set(records) == set(ROLES)
    val_labels = [0, 0, 999, 999] + [label for name in SUBSET_SETS for _, label in world["filed"][name]]
    expected_n = {"imagenet": len(val_labels)}
    for name in SUBSET_SETS:
        subset = set(get_adapter(name).imagenet_subset or [])
        expected_n[f"imagenet@{name[-1]}-classes"] = sum(label in subset for label in val_labels)
    for name, role in ROLES.items():
        record = records[name]
        assert (record["model"], record["role"], record["n"]) == ("zeroshot", role, expected_n.get(name, 4)), name
        assert record["seed"] is None and record["alpha"] is None
        assert record["group"] == ({"imagenet@a-classes": "imagenet-a", "imagenet@r-classes": "imagenet-r"}
                                   .get(name))
    # Effective robustness against the shipped testbed fit; -R's x is ImageNet on -R's 200 classes.
    from saft.eval.robustness import load_reference

    reference = load_reference("taori2020-testbed")
    (agg,) = doc["aggregates"]
    per_shift = agg["effective_robustness_per_shift"]
    assert set(per_shift) == {"imagenet-v2", "imagenet-sketch", "imagenet-r"}  # -A: no published single line
    assert per_shift["imagenet-r"]["mean"] == pytest.approx(reference.effective_robustness(
        "imagenet-r", records["imagenet@r-classes"]["top1"], records["imagenet-r"]["top1"]))
    assert per_shift["imagenet-v2"]["mean"] == pytest.approx(reference.effective_robustness(
        "imagenet-v2", records["imagenet"]["top1"], records["imagenet-v2"]["top1"]))
    assert "imagenet-a" in doc["definitions"]["effective_robustness_missing"]
    # One 1000-class head serves all five sets: same classes, same 'simple' templates.
    assert len(list((tmp_path / "cache" / "heads").glob("*.safetensors"))) == 1
    assert doc["meta"]["suite"] == "imagenet-shifts"
    assert (out / "report.html").is_file() and (out / "report.md").is_file()

    loaded = world["loaded"]
    for name in SUBSET_SETS:
        subset = get_adapter(name).imagenet_subset or []
        images, labels = zip(*world["filed"][name])
        pixels = torch.stack([loaded.preprocess(image.convert("RGB")) for image in images])
        # An explicit 200-way head over the subset's names; labels as positions in the subset.
        subset_head = build_head(loaded.model, loaded.tokenizer, [world["names"][i] for i in subset],
                                 world["templates"], classes_per_batch=len(subset))
        positions = torch.tensor([subset.index(label) for label in labels])
        explicit = evaluate_head(loaded.model, subset_head, TensorDataset(pixels, positions))
        unrestricted = evaluate_head(loaded.model, world["full_head"], TensorDataset(pixels, torch.tensor(labels)))
        assert records[name]["top1"] == explicit.top1 == 1.0, name
        assert unrestricted.top1 == 0.0  # what scoring over all 1000 classes would have reported
