import json

import pytest
import yaml

from saft.cli import main
from saft.data.synth import write_domain
from saft.eval.suites import SuiteError, load_suite
from saft.steps.evaluate import DeltaRun
from saft.steps.finetune import finetune_step
from saft.steps.score import ScoreConfig, score_step
from saft.sparse import FinetuneConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    write_domain(base / "id", "photo", per_class=6)
    write_domain(base / "shifted", "sketch", per_class=4)
    assert main(["data", "prepare", str(base / "id"), "--out", str(base / "data"), "--shots", "4"]) == 0
    score_step(ScoreConfig(model="saft-tiny-vit", density=0.005), base / "data", base / "score", progress=False)
    for seed in (1, 2):
        cfg = FinetuneConfig(steps=3, batch_size=8, lr=1e-2, seed=seed)
        finetune_step("saft-tiny-vit", cfg, base / "data", base / f"saft{seed}",
                      mask_path=base / "score" / "mask.safetensors", progress=False)
    suite = {"name": "toy-shifts", "datasets": [
        {"name": "shapes", "dataset": "imagefolder", "root": "id", "role": "id"},
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


def test_reused_images_decode_once_within_the_budget() -> None:
    import torch

    from saft.steps.evaluate import ReusedImages

    reads = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            reads.append(i)
            return torch.zeros(3, 2, 2), i  # 48 bytes each

    budget = [100]  # room for two images
    data = ReusedImages(Counting(), budget)
    first = [data[i][1] for i in range(4)]
    second = [data[i][1] for i in range(4)]
    assert first == second == [0, 1, 2, 3]
    assert reads == [0, 1, 2, 3, 2, 3]  # the first two were kept, the rest streamed again
    assert budget == [4]
