"""Metrics with published names, against values computed by hand.

Effective robustness (Taori et al. 2020): OOD accuracy minus the accuracy a line in logit
space, fitted over reference models, predicts from ID accuracy. Base-to-new (CoCoOp):
HM of the mean base and the mean new accuracy. Seeds: no spread from one seed.
"""

import math

import pytest
import yaml

from saft.eval.metrics import Record, aggregate, metrics_document, records_from_document, stat
from saft.eval.robustness import ReferenceError, builtin_references, fit_line, load_reference


def _logistic(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# Three reference models whose logits are (ID, OOD) = (0, -1), (1, 0.2), (2, 1): by hand,
# mean x = 1, mean y = 0.2/3, Sxx = 2, Sxy = (-1)(-1 - 0.2/3) + 0 + (1)(1 - 0.2/3) = 2,
# so slope = 1 and intercept = 0.2/3 - 1 = -0.93333.
REFERENCE = {
    "format": "saft-reference/1", "name": "hand", "transform": "logit", "source": "a test",
    "shifts": {"v2": {"x": "id"}, "r": {"x": "id_on_shift_classes"}},
    "models": [{"name": f"m{i}", "id": _logistic(x), "ood": {"v2": _logistic(y), "r": _logistic(y)},
                "id_on_shift_classes": {"r": _logistic(x)}} for i, (x, y) in enumerate([(0, -1), (1, 0.2), (2, 1)])],
}
SLOPE, INTERCEPT = 1.0, 0.2 / 3 - 1


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(REFERENCE))
    return load_reference(str(path))


def test_one_seed_has_no_spread_and_two_seeds_the_sample_std():
    assert stat([0.7]) == {"mean": 0.7, "std": None}
    two = stat([0.70, 0.72])
    assert two["mean"] == pytest.approx(0.71) and two["std"] == pytest.approx(math.sqrt(2 * 0.01 ** 2))
    (agg,) = aggregate([Record("saft", "in", "id", 0.7, 10, 1), Record("saft", "out", "ood", 0.5, 10, 1)])
    assert agg["id"]["std"] is None and agg["ood_mean"]["std"] is None
    assert agg["per_dataset"]["in"]["std"] is None and agg["per_dataset"]["in"]["n_seeds"] == 1


def test_hm_is_the_harmonic_mean_of_the_means_per_dataset_and_over_datasets():
    rows = {("pets", "base"): (0.90, 0.92), ("pets", "new"): (0.60, 0.64),
            ("cars", "base"): (0.70, 0.70), ("cars", "new"): (0.50, 0.54)}
    recs = [Record("saft", f"{g}/{role}", role, v, 10, seed, 1.0, g)
            for (g, role), values in rows.items() for seed, v in zip((1, 2), values)]
    (agg,) = aggregate(recs)
    b2n = agg["base_to_new"]
    assert b2n["pets"]["base"]["mean"] == pytest.approx(0.91) and b2n["pets"]["new"]["mean"] == pytest.approx(0.62)
    assert b2n["pets"]["hm"] == {"mean": pytest.approx(2 * 0.91 * 0.62 / 1.53), "std": None}  # 0.73752
    assert b2n["cars"]["hm"]["mean"] == pytest.approx(2 * 0.70 * 0.52 / 1.22)  # 0.59672
    # over datasets: base per seed 0.80 / 0.81, new 0.55 / 0.59
    assert agg["base"]["mean"] == pytest.approx(0.805) and agg["base"]["std"] == pytest.approx(math.sqrt(5e-5))
    assert agg["new"]["mean"] == pytest.approx(0.57) and agg["new"]["std"] == pytest.approx(math.sqrt(8e-4))
    assert agg["hm"] == {"mean": pytest.approx(0.6674182), "std": None}  # HM(0.805, 0.57), not a mean of HMs
    per_seed_mean = (2 * 0.8 * 0.55 / 1.35 + 2 * 0.81 * 0.59 / 1.40) / 2
    assert abs(agg["hm"]["mean"] - per_seed_mean) > 1e-4
    # CoCoOp's Table 1, zero-shot CLIP averaged over 11 datasets: base 69.34, new 74.22, H 71.70
    recs = [Record("clip", "a/base", "base", 0.6934, 1, group="a"), Record("clip", "a/new", "new", 0.7422, 1, group="a")]
    assert round(100 * aggregate(recs)[0]["hm"]["mean"], 2) == 71.70


def test_base_new_records_need_their_dataset_and_old_documents_get_it_from_the_name():
    with pytest.raises(ValueError, match="needs a group"):
        Record("saft", "pets/base", "base", 0.5, 1)
    old = {"schema": "saft-metrics/1", "records": [
        {"model": "saft", "dataset": "pets/base", "role": "base", "top1": 0.9, "n": 5, "seed": 1, "alpha": 1.0},
        {"model": "saft", "dataset": "pets/new", "role": "new", "top1": 0.6, "n": 5, "seed": 1, "alpha": 1.0}]}
    assert {r.group for r in records_from_document(old)} == {"pets"}


def test_fit_line_by_hand():
    slope, intercept = fit_line([0.0, 1.0, 2.0], [-1.0, 0.2, 1.0])
    assert slope == pytest.approx(SLOPE) and intercept == pytest.approx(INTERCEPT)


def test_effective_robustness_against_a_hand_fitted_reference(reference):
    assert reference.fits["v2"].slope == pytest.approx(SLOPE)
    assert reference.fits["v2"].intercept == pytest.approx(INTERCEPT)
    assert reference.fits["v2"].n_models == 3 and reference.fits["r"].x == "id_on_shift_classes"
    # seed 1: ID 0.5 -> predicted logistic(-0.93333) = 0.282249; seed 2: ID 0.6 -> logistic(logit(0.6) - 0.93333)
    recs = [Record("saft", "in", "id", 0.5, 10, 1), Record("saft", "v2", "ood", 0.40, 10, 1),
            Record("saft", "in", "id", 0.6, 10, 2), Record("saft", "v2", "ood", 0.50, 10, 2),
            # the shift on a class subset reads its x from the id_subset record of the same seed
            Record("saft", "in@r", "id_subset", 0.5, 10, 1, group="r"), Record("saft", "r", "ood", 0.30, 10, 1),
            Record("saft", "in@r", "id_subset", 0.5, 10, 2, group="r"), Record("saft", "r", "ood", 0.30, 10, 2)]
    (agg,) = aggregate(recs, reference)
    er_v2 = [0.40 - 0.2822489, 0.50 - 0.3710142]
    er_r = [0.30 - 0.2822489] * 2
    per_shift = agg["effective_robustness_per_shift"]
    assert per_shift["v2"]["mean"] == pytest.approx(sum(er_v2) / 2, abs=1e-6)
    assert per_shift["v2"]["std"] == pytest.approx(abs(er_v2[0] - er_v2[1]) / math.sqrt(2), abs=1e-6)
    assert per_shift["r"]["mean"] == pytest.approx(er_r[0], abs=1e-6)
    # the average: per seed the mean over shifts, then over seeds
    assert agg["effective_robustness"]["mean"] == pytest.approx((sum(er_v2) + sum(er_r)) / 4, abs=1e-6)
    assert "in@r" not in [d for d, v in agg["per_dataset"].items() if v["role"] in ("id", "ood")]
    assert agg["id"]["mean"] == pytest.approx(0.55)  # the id_subset entry enters no mean


def test_a_reference_model_on_its_own_line_has_zero_effective_robustness(reference):
    recs = [Record("zeroshot", "in", "id", _logistic(1.0), 10), Record("zeroshot", "v2", "ood", _logistic(0.0667), 10)]
    (agg,) = aggregate(recs, reference)
    assert agg["effective_robustness"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert agg["effective_robustness"]["std"] is None


def test_no_reference_no_effective_robustness():
    recs = [Record("zeroshot", "in", "id", 0.6, 10), Record("zeroshot", "out", "ood", 0.45, 10),
            Record("saft", "in", "id", 0.7, 10, 1), Record("saft", "out", "ood", 0.40, 10, 1)]
    doc = metrics_document(recs, {"suite": "synthshift"})
    for agg in doc["aggregates"]:
        assert not any(key.startswith("effective_robustness") for key in agg)
    saft = next(a for a in doc["aggregates"] if a["model"] == "saft")
    assert saft["ood_gain"] == pytest.approx(-0.05) and saft["id_gain"] == pytest.approx(0.10)
    assert "effective_robustness" not in doc["definitions"] and "ood_gain" in doc["definitions"]


def test_the_document_carries_its_reference_and_says_how_every_aggregate_was_computed(reference):
    recs = [Record("zeroshot", "in", "id", 0.6, 10), Record("zeroshot", "v2", "ood", 0.45, 10)]
    doc = metrics_document(recs, {"suite": "s"}, reference)
    assert doc["meta"]["effective_robustness_reference"]["fits"]["v2"]["slope"] == pytest.approx(SLOPE)
    again = metrics_document(records_from_document(doc), doc["meta"])  # collect recomputes from the meta
    assert again["aggregates"] == doc["aggregates"]
    for key in ("per_dataset", "id", "ood_mean", "effective_robustness", "effective_robustness_per_shift"):
        assert key in doc["definitions"] and "{" not in doc["definitions"][key]
    assert "logit" in doc["definitions"]["effective_robustness_per_shift"]


def test_probit_reference_and_given_coefficients(tmp_path):
    path = tmp_path / "fits.yaml"
    path.write_text(yaml.safe_dump({"format": "saft-reference/1", "transform": "probit",
                                    "fits": {"v2": {"slope": 1.0, "intercept": 0.0}}}))
    ref = load_reference(str(path))
    assert ref.fits["v2"].n_models is None
    # slope 1, intercept 0 in probit space: the prediction is the ID accuracy itself
    assert ref.effective_robustness("v2", 0.7, 0.65) == pytest.approx(-0.05)


@pytest.mark.parametrize("change, message", [
    ({"format": "x"}, "format"),
    ({"transform": "linear"}, "transform must be one of"),
    ({"fits": {"v2": {"slope": 1, "intercept": 0}}}, "either 'models'"),
    ({"models": [{"name": "a", "id": 70, "ood": {"v2": 0.5}}]}, r"model 'a': id: expected a top-1 fraction"),
    ({"models": [{"name": "a", "id": 0.7, "ood": {"v2": 0.5}}]}, "1 reference model"),
    ({"models": [{"name": "a", "id": 0.7, "ood": {"r": 0.5}}, {"name": "b", "id": 0.8, "ood": {"r": 0.6}}]},
     "give id_on_shift_classes.r"),
])
def test_bad_reference_files_name_the_field(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**REFERENCE, **change}))
    with pytest.raises(ReferenceError, match=message):
        load_reference(str(path))
    with pytest.raises(ReferenceError, match="unknown effective-robustness reference"):
        load_reference("no-such-reference")


def test_shipped_testbed_reference():
    assert "taori2020-testbed" in builtin_references()
    ref = load_reference("taori2020-testbed")
    assert set(ref.fits) == {"imagenet-v2", "imagenet-sketch", "imagenet-r"} and "imagenet-a" in ref.missing
    assert ref.fits["imagenet-r"].x == "id_on_shift_classes" and ref.fits["imagenet-v2"].x == "id"
    assert all(f.n_models >= 50 for f in ref.fits.values())
    # a standard model lies near the line of standard models: ResNet-50 (testbed: ImageNet 76.13, V2 63.21,
    # Sketch 24.09, -R 36.17 at 92.12 on -R's classes) within 3 points of each fit
    assert abs(ref.effective_robustness("imagenet-v2", 0.7613, 0.6321)) < 0.03
    assert abs(ref.effective_robustness("imagenet-sketch", 0.7613, 0.2409)) < 0.03
    assert abs(ref.effective_robustness("imagenet-r", 0.9212, 0.3617)) < 0.03


def test_shifts_without_effective_robustness_say_why(reference):
    recs = [Record("zeroshot", "in", "id", 0.6, 10), Record("zeroshot", "v2", "ood", 0.45, 10),
            Record("zeroshot", "r", "ood", 0.30, 10), Record("zeroshot", "sketch", "ood", 0.20, 10)]
    doc = metrics_document(recs, {"suite": "s"}, reference)
    assert set(doc["aggregates"][0]["effective_robustness_per_shift"]) == {"v2"}
    why = doc["definitions"]["effective_robustness_missing"]
    assert "r: its fit's x-axis is ID top-1 on the shift's classes" in why
    assert "sketch: no fit in the reference 'hand'" in why
