import json

import pytest
import yaml

from saft.cli import main
from saft.data.synth import write_domain
from saft.eval.suites import SuiteError, load_suite
from saft.steps.evaluate import DeltaRun
from saft.steps.finetune import finetune_step
from saft.steps.score import ScoreConfig, score_step
from saft.steps.configs import FinetuneStepConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    write_domain(base / "id", "photo", per_class=6)
    write_domain(base / "id-test", "photo", per_class=6, start=1000)  # apart from the training images
    write_domain(base / "shifted", "sketch", per_class=4)
    assert main(["data", "prepare", "--val-shots", "0", str(base / "id"), "--out", str(base / "data"), "--shots", "4"]) == 0
    score_step(ScoreConfig(model="saft-tiny-vit", density=0.005), base / "data", base / "score", progress=False)
    for seed in (1, 2):
        cfg = FinetuneStepConfig(model="saft-tiny-vit", steps=3, batch_size=8, lr=1e-2, seed=seed)
        finetune_step(cfg, base / "data", base / f"saft{seed}", mask_path=base / "score" / "mask.safetensors",
                      progress=False)
    suite = {"name": "toy-shifts", "datasets": [
        {"name": "shapes", "dataset": "imagefolder", "root": "id-test", "role": "id"},
        {"name": "shapes-shifted", "dataset": "imagefolder", "root": "shifted", "role": "ood"}]}
    (base / "suite.yaml").write_text(yaml.safe_dump(suite))
    return base


def test_evaluate_suite_with_seeds_and_alphas(world, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["evaluate", "--model", "saft-tiny-vit", "--suite", str(world / "suite.yaml"), "--data-root", str(world),
               "--delta", f"saft:1={world / 'saft1' / 'delta.safetensors'}",
               "--delta", f"saft:2={world / 'saft2' / 'delta.safetensors'}",
               "--alpha", "0", "1", "--out", str(tmp_path / "out"), "--batch-size", "16"])
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    recs = doc["records"]
    assert len(recs) == 2 + 2 * 2 * 2
    assert {r["n"] for r in recs if r["dataset"] == "shapes"} == {60}
    zs = {r["dataset"]: r["top1"] for r in recs if r["model"] == "zeroshot"}
    for r in recs:
        if r["model"] == "saft" and r["alpha"] == 0.0:  # base + 0 * delta is the base
            assert r["top1"] == zs[r["dataset"]]
    aggs = {(a["model"], a["alpha"]): a for a in doc["aggregates"]}
    assert aggs[("saft", 1.0)]["seeds"] == [1, 2]
    assert "ood_gain" in aggs[("saft", 1.0)] and "effective_robustness" not in aggs[("saft", 1.0)]  # no reference
    for name in ("report.md", "report.html", "id_vs_ood.png", "per_dataset.png", "alpha_curve.png"):
        assert (tmp_path / "out" / name).is_file()
    # one head per distinct weights (both datasets share classes and templates; alpha 0 is the base)
    assert len(list((tmp_path / "cache" / "heads").glob("*.safetensors"))) == 1 + 2


def test_base_new_roles_score_halves(world, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    suite = {"datasets": [{"name": "b", "dataset": "imagefolder", "root": "id", "role": "base"},
                          {"name": "n", "dataset": "imagefolder", "root": "id", "role": "new"}]}
    (tmp_path / "b2n.yaml").write_text(yaml.safe_dump(suite))
    rc = main(["evaluate", "--model", "saft-tiny-vit", "--suite", str(tmp_path / "b2n.yaml"), "--data-root",
               str(world), "--out", str(tmp_path / "out")])
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {r["dataset"]: r["n"] for r in doc["records"]} == {"b": 30, "n": 30}
    assert {r["group"] for r in doc["records"]} == {"id"}  # paired by their common root
    assert "hm" in doc["aggregates"][0] and set(doc["aggregates"][0]["base_to_new"]) == {"id"}
    from saft.io import load_tensors

    heads = [load_tensors(p, "saft-head/1", "head")[0]["head"] for p in (tmp_path / "cache" / "heads").glob("*")]
    assert sorted(h.shape[0] for h in heads) == [5, 5]  # each half scored by a head over its own 5 classes


def test_suite_errors(tmp_path):
    with pytest.raises(SuiteError, match="unknown suite"):
        load_suite("imagenet-shiftz")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": [{"dataset": "imagefolder", "role": "test"}]}))
    with pytest.raises(SuiteError, match="role"):
        load_suite(str(bad))
    bad.write_text(yaml.safe_dump({"datasets": [{"dataset": "imagefolder", "role": "base"}]}))
    with pytest.raises(SuiteError, match="exactly one 'base' and one 'new'"):
        load_suite(str(bad))
    bad.write_text(yaml.safe_dump({"datasets": [{"name": "in", "dataset": "imagenet", "role": "id"},
                                                {"name": "in@a", "dataset": "imagenet", "role": "id_subset",
                                                 "group": "imagenet-a"}]}))
    with pytest.raises(SuiteError, match="needs 'group' naming an OOD entry"):
        load_suite(str(bad))
    with pytest.raises(ValueError, match="NAME"):
        DeltaRun.parse("just-a-path.safetensors")
    assert DeltaRun.parse("full:3=/x/d.safetensors") == DeltaRun("full", "/x/d.safetensors", 3)


def test_builtin_suites_resolve_default_folders():
    suite = load_suite("imagenet-shifts", "/data")
    roots = {e.name: (e.root, e.role) for e in suite.entries}
    assert roots["imagenet"] == ("/data/imagenet/images", "id")
    assert roots["imagenet-r"] == ("/data/imagenet-rendition", "ood")
    assert len(load_suite("cross-dataset", "s3://bucket/data").entries) == 11
    assert load_suite("cross-dataset", "s3://bucket/data").entries[1].root == "s3://bucket/data/caltech-101"
    b2n = load_suite("base2new", "/d")
    assert len(b2n.entries) == 22 and {e.role for e in b2n.entries} == {"base", "new"}


def test_each_image_is_decoded_once_for_all_variants(world, tmp_path, monkeypatch):
    """Zero-shot + 2 deltas x 2 alphas = 5 variants, and every image is decoded exactly once; each
    variant's accuracy equals an independent evaluation of base + alpha * delta."""
    import saft
    import saft.steps.evaluate as evaluate_module
    from saft.eval import build_head, evaluate_head
    from saft.steps.evaluate import EntryImages, EvaluateConfig, _task, evaluate_suite

    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    decoded = []
    real = evaluate_module.load_rgb
    monkeypatch.setattr(evaluate_module, "load_rgb", lambda src, uri: decoded.append(uri) or real(src, uri))
    runs = [DeltaRun("saft", str(world / f"saft{s}" / "delta.safetensors"), s) for s in (1, 2)]
    cfg = EvaluateConfig(model="saft-tiny-vit", deltas=runs, alphas=[0.5, 1.0], batch_size=16, num_workers=0)
    suite = load_suite(str(world / "suite.yaml"), str(world))
    doc = evaluate_suite(cfg, suite, tmp_path / "out", progress=False, log=lambda _: None)
    assert len(doc["records"]) == 2 * 5
    assert len(decoded) == len(set(decoded)) == 60 + 40

    loaded = saft.load_model("saft-tiny-vit")
    task = _task(suite.entries[1], "default")
    delta = saft.load_delta(runs[1].path)
    saft.apply_delta(loaded.model, delta, 0.5)
    head = build_head(loaded.model, loaded.tokenizer, task.classes, task.templates)
    expected = evaluate_head(loaded.model, head, EntryImages(task.entry.root, task.images, loaded.preprocess))
    got = next(r for r in doc["records"] if r["dataset"] == "shapes-shifted" and r["seed"] == 2 and r["alpha"] == 0.5)
    assert got["top1"] == expected.top1 and got["n"] == expected.n


def test_a_delta_of_another_base_is_refused_before_any_image_is_read(world, tmp_path):
    from saft.sparse import FingerprintMismatch
    from saft.steps.evaluate import EvaluateConfig, evaluate_suite

    cfg = EvaluateConfig(model="saft-tiny-vit-quickgelu", deltas=[DeltaRun("saft", str(world / "saft1" / "delta.safetensors"), 1)])
    with pytest.raises(FingerprintMismatch, match="evaluate it with its own base model"):
        evaluate_suite(cfg, load_suite(str(world / "suite.yaml"), str(world)), tmp_path / "out", progress=False)


def test_every_method_evaluates_with_its_own_delta_kind(world, tmp_path, monkeypatch):
    """lora (low-rank), lpft (dense + head offsets) and WiSE-FT (full's delta at one alpha) in one evaluation."""
    from saft.sparse import load_delta

    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    for method in ("full", "lora", "lpft"):
        cfg = FinetuneStepConfig(model="saft-tiny-vit", method=method, steps=3, batch_size=8, lr=1e-3, seed=1,
                                 probe_steps=20, probe_lr=1e-2)
        finetune_step(cfg, world / "data", tmp_path / method, progress=False)
    lpft = load_delta(tmp_path / "lpft" / "delta.safetensors")
    assert lpft.head is not None
    lpft.head = None  # the same weights without the probe's head: the head must change what evaluation measures
    lpft.head_classes = ()
    lpft.save(tmp_path / "lpft-headless.safetensors")
    full = tmp_path / "full" / "delta.safetensors"
    rc = main(["evaluate", "--model", "saft-tiny-vit", "--suite", str(world / "suite.yaml"), "--data-root", str(world),
               "--delta", f"full:1={full}", "--delta", f"wiseft:1@0.5={full}",
               "--delta", f"lora:1={tmp_path / 'lora' / 'delta.safetensors'}",
               "--delta", f"lpft:1={tmp_path / 'lpft' / 'delta.safetensors'}",
               "--delta", f"headless:1={tmp_path / 'lpft-headless.safetensors'}",
               "--alpha", "0", "0.5", "1", "--out", str(tmp_path / "out"), "--batch-size", "16"])
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    top1 = {(r["model"], r["dataset"], r["alpha"]): r["top1"] for r in doc["records"]}
    for dataset in ("shapes", "shapes-shifted"):
        assert top1[("wiseft", dataset, None)] == top1[("full", dataset, 0.5)]  # one point of full's curve
        for method in ("lora", "lpft"):  # alpha 0 is the base, head offsets included
            assert top1[(method, dataset, 0.0)] == top1[("zeroshot", dataset, None)]
    assert not any(a == 0.0 or a == 1.0 for m, _, a in top1 if m == "wiseft")
    assert any(top1[("lpft", d, 1.0)] != top1[("headless", d, 1.0)] for d in ("shapes", "shapes-shifted"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "low-rank (rank 8)" in report and "dense (every eligible entry) + class head" in report
    assert "full's delta at alpha 0.5" in report


def test_delta_run_arguments_round_trip():
    run = DeltaRun.parse("wiseft:2@0.7=runs/s2/full/delta.safetensors")
    assert (run.name, run.seed, run.alpha, run.path) == ("wiseft", 2, 0.7, "runs/s2/full/delta.safetensors")
    assert DeltaRun.parse(str(run)) == run and DeltaRun.parse(str(DeltaRun("saft", "p"))) == DeltaRun("saft", "p")
    with pytest.raises(ValueError, match="alpha after @"):
        DeltaRun.parse("wiseft:1@half=p")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        DeltaRun.parse("wiseft@1.5=p")
