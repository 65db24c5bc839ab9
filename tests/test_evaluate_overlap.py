"""Evaluation refuses images a delta was trained or validated on (or, asked to allow them, records that it did
not check); one-class data and class names a prompt cannot carry are refused at prepare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from saft.cli import main
from saft.data.prepare import PrepareError, check_class_names


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("overlap")
    assert main(["world", "--out", str(base / "W"), "--pool-per-class", "4", "--test-per-class", "1"]) == 0
    assert main(["data", "prepare", str(base / "W/photo/pool"), "--shots", "2", "--val-shots", "1",
                 "--out", str(base / "D")]) == 0
    assert main(["finetune", "--model", "tiny", "--method", "full", "--data", str(base / "D"), "--steps", "1",
                 "--batch-size", "4", "--out", str(base / "F"), "--num-workers", "0"]) == 0
    for name, root in (("leaky", "W/photo/pool"), ("clean", "W/photo/test")):
        suite = {"name": name, "datasets": [{"name": "photo", "dataset": "imagefolder", "root": root, "role": "id"}]}
        (base / f"{name}.yaml").write_text(yaml.safe_dump(suite))
    return base


def _evaluate(base: Path, suite: str, out: str, *extra: str) -> int:
    return main(["evaluate", "--model", "tiny", "--suite", str(base / f"{suite}.yaml"), "--data-root", str(base),
                 "--delta", f"full:1={base / 'F/delta.safetensors'}", "--out", str(base / out), "--num-workers", "0",
                 *extra])


def test_an_evaluation_image_the_delta_was_trained_on_is_refused(trained: Path, capsys) -> None:
    assert _evaluate(trained, "leaky", "E1") == 2
    err = capsys.readouterr().err
    assert "evaluation image is also a training image of full seed 1" in err and "--allow-train-overlap" in err
    assert not (trained / "E1" / "metrics.json").exists()


def test_allowed_overlap_is_scored_and_recorded_as_unchecked(trained: Path) -> None:
    assert _evaluate(trained, "leaky", "E2", "--allow-train-overlap") == 0
    meta = json.loads((trained / "E2" / "metrics.json").read_text())["meta"]
    assert meta["train_overlap"].startswith("not checked")


def test_a_disjoint_test_set_is_checked_and_scored(trained: Path) -> None:
    assert _evaluate(trained, "clean", "E3") == 0
    meta = json.loads((trained / "E3" / "metrics.json").read_text())["meta"]
    assert meta["train_overlap"].startswith("checked: no evaluation image is one of the 30 images")  # 10 x (2 + 1)


def test_a_delta_away_from_its_training_data_is_recorded_as_unchecked(trained: Path, tmp_path: Path) -> None:
    import shutil

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(trained / "F" / "delta.safetensors", lone / "delta.safetensors")  # no finetune record beside it
    assert main(["evaluate", "--model", "tiny", "--suite", str(trained / "clean.yaml"), "--data-root", str(trained),
                 "--delta", f"full:1={lone / 'delta.safetensors'}", "--out", str(tmp_path / "E"),
                 "--num-workers", "0"]) == 0
    meta = json.loads((tmp_path / "E" / "metrics.json").read_text())["meta"]
    assert meta["train_overlap"].startswith("not checked for 1 delta(s) whose training data is not here")


def test_class_names_a_classifier_cannot_use_are_refused_or_flagged() -> None:
    with pytest.raises(PrepareError, match="holds 1 class .*needs at least two"):
        check_class_names(["cat"], "root")
    with pytest.raises(PrepareError, match=r"class name 'dog\\x00' holds control or invisible characters"):
        check_class_names(["cat", "dog\x00"], "root")
    with pytest.raises(PrepareError, match="invisible"):
        check_class_names(["cat", "d\u200bog"], "root")  # a zero-width space
    warnings = check_class_names(["Sea_Lion", "sea lion", "ｃａｔ", "cat", "dog"], "root")
    assert len(warnings) == 2 and "'Sea_Lion' and 'sea lion' read the same" in warnings[0]
