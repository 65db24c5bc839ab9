"""The protocols end to end on small data: base-to-new on the embedded world and on CoOp
fixture trees (one training per dataset), cross-dataset from an ImageNet fixture tree to
the ten CoOp datasets, the checks that run before any training, and the few-shot grid.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from coop_trees import CLASSES, SPLIT_JSON_SETS, write_aircraft, write_imagenet, write_split_json_set

from saft.cli import main
from saft.eval.metrics import harmonic_mean
from saft.eval.suites import COOP_DATASETS, DEFAULT_FOLDERS, Suite, SuiteEntry, load_suite
from saft.steps.params import ParamsError, load_params
from saft.orchestration.plan import check_protocol, training_plan

REPO = Path(__file__).resolve().parents[1]
TINY_WORLD = ["seeds=[1]", "world.pool_per_class=8", "world.test_per_class=4", "data.shots=2", "data.val_shots=1",
              "finetune.steps=2", "finetune.warmup_steps=0", "finetune.methods=[zeroshot, saft]"]


def _args(out: Path, overrides: list[str]) -> list[str]:
    args = ["run", "--params", str(REPO / "params.yaml"), "--out", str(out), "--no-tracking"]
    for item in overrides:
        args += ["--set", item]
    return args


def _register_offline(monkeypatch, run: Path, task_dir: Path, model: str) -> dict:
    """The register step with tracking off: it judges the candidate and registers nothing."""
    from saft.steps.register import RegisterConfig, register_step

    monkeypatch.setenv("SAFT_TRACKING", "off")
    return register_step(RegisterConfig(), run / "eval" / "metrics.json", task_dir / "saft" / "delta.safetensors",
                         run / "register", base_model=model, data_dir=task_dir / "data")


@pytest.mark.slow
def test_base_to_new_on_the_embedded_world(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(_args(out, TINY_WORLD + ["data.subset=base"])) == 0
    assert "HM" in capsys.readouterr().out
    from saft.data.synth import SHAPES

    classes = json.loads((out / "seed1" / "data" / "classes.json").read_text())
    assert classes == sorted(SHAPES)[:5]  # the first half of the 10 shape folders, in label order
    doc = json.loads((out / "eval" / "metrics.json").read_text())
    assert {(r["dataset"], r["role"], r["group"]) for r in doc["records"]} == {
        ("photo/base", "base", "photo"), ("photo/new", "new", "photo")}
    saft = next(a for a in doc["aggregates"] if a["model"] == "saft")
    assert saft["hm"]["mean"] == pytest.approx(harmonic_mean(saft["base"]["mean"], saft["new"]["mean"]))
    assert saft["base"]["std"] is None  # one seed: no spread, and the report shows none
    page = (out / "eval" / "report.html").read_text()
    for text in ("Run", "Methods", "Base-to-new", "How each number is computed", "weights sha256",
                 "data version", "0.1000%"):
        assert text in page, text
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert cells and not [c for c in cells if "±" in c]  # one seed: no spread shown, not "± 0.00"
    for figure in ("mask_landing.png", "training_curves.png", "base_to_new.png"):
        assert (out / "eval" / figure).is_file() and figure in page
    result = _register_offline(monkeypatch, out, out / "seed1", "tiny")
    assert result["verdict"] == "skipped" and [c["name"] for c in result["checks"]] == ["HM vs zero-shot"]
    assert result["candidate"]["hm"] == pytest.approx(saft["hm"]["mean"]) and result["candidate"]["id"] is None


def _suite(name: str, *entries: SuiteEntry) -> Suite:
    return Suite(name, tuple(entries))


def test_the_protocol_is_checked_before_anything_trains(tmp_path):
    b2n = _suite("b2n", SuiteEntry("a/base", "imagefolder", "base", group="a"),
                 SuiteEntry("a/new", "imagefolder", "new", group="a"))
    shifts = _suite("shifts", SuiteEntry("in", "imagefolder", "id"), SuiteEntry("out", "imagefolder", "ood"))
    two = _suite("two", *b2n.entries, SuiteEntry("b/base", "dtd", "base", "r", group="b"),
                 SuiteEntry("b/new", "dtd", "new", "r", group="b"))
    params = load_params(None, ["data.subset=base"])
    assert check_protocol(params, b2n, training_plan(params, b2n, "pool")) == "hm"
    with pytest.raises(ParamsError, match="no base/new entries"):
        check_protocol(params, shifts, training_plan(params, shifts, "pool"))
    with pytest.raises(ParamsError, match="no single candidate"):
        check_protocol(params, two, training_plan(params, two, "pool"))
    plan = training_plan(params, two, "pool")
    assert [(t.name, t.dataset, t.root, t.entries) for t in plan][1] == ("b", "dtd", "r", ("b/base", "b/new"))
    params = load_params(None, [])
    assert check_protocol(params, shifts, training_plan(params, shifts, "pool")) == "id_ood"
    with pytest.raises(ParamsError, match="data.subset: base"):
        check_protocol(params, b2n, training_plan(params, b2n, "pool"))
    params = load_params(None, ["evaluate.suite=cross-dataset"])
    cross = load_suite("cross-dataset", str(tmp_path))
    with pytest.raises(ParamsError, match="trains on ImageNet"):
        check_protocol(params, cross, training_plan(params, cross, "pool"))
    with pytest.raises(ParamsError, match="data.subset must be one of"):
        load_params(None, ["data.subset=new"])
    # through `saft run`: refused after rendering the world, before the first prepare
    code = main(_args(tmp_path / "run", TINY_WORLD + ["evaluate.suite=synthshift-b2n"]))
    assert code == 2 and not (tmp_path / "run" / "seed1").exists()
    # the pipeline's first task after the world makes the same check
    from saft.orchestration.eval_tasks import protocol_task, suite_datasets

    world = str(tmp_path / "run" / "world")
    assert protocol_task(json.dumps(load_params(None, ["data.subset=base"]).to_dict()), world) == "hm"
    assert suite_datasets(world, "synthshift-b2n", "") == ["photo/base", "photo/new"]
    with pytest.raises(ParamsError, match="data.subset: base"):
        protocol_task(json.dumps(load_params(None, ["evaluate.suite=synthshift-b2n"]).to_dict()), world)


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> Path:
    """The ten CoOp datasets in their real layouts under their default folders."""
    root = tmp_path_factory.mktemp("coop")
    for i, name in enumerate(COOP_DATASETS):
        where = root / DEFAULT_FOLDERS[name]
        if name == "fgvc_aircraft":
            write_aircraft(where, {"train": 2, "val": 1, "test": 1}, seed=1000 * i)
        else:
            write_split_json_set(where, name, {"train": 2, "val": 1, "test": 1}, seed=1000 * i)
    return root


@pytest.mark.slow
def test_base2new_trains_one_model_per_dataset(coop_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    entries = [{"name": f"{ds}/{half}", "dataset": ds, "role": half, "split": "test"}
               for ds in ("dtd", "eurosat") for half in ("base", "new")]
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"name": "b2n-two", "datasets": entries}))
    out = tmp_path / "run"
    overrides = ["model=saft-tiny-vit", "seeds=[1]", "data.shots=1", "data.val_shots=0", "data.subset=base",
                 "data.root=unused-per-dataset", f"evaluate.suite={tmp_path / 'suite.yaml'}",
                 f"evaluate.data_root={coop_root}", "finetune.steps=1", "finetune.warmup_steps=0",
                 "finetune.methods=[saft]", "register.enabled=false"]
    assert main(_args(out, overrides)) == 0
    for ds in ("dtd", "eurosat"):  # each trained on its own base half, from its own root
        prepared = json.loads((out / "seed1" / ds / "data" / "prepare.json").read_text())
        assert prepared["dataset"] == ds and prepared["subset"] == "base" and prepared["split"] == "train"
        assert json.loads((out / "seed1" / ds / "data" / "classes.json").read_text()) == list(CLASSES[:2])
        part = json.loads((out / "eval" / "parts" / ds / "metrics.json").read_text())
        assert {r["group"] for r in part["records"]} == {ds}  # its deltas score its own halves only
    doc = json.loads((out / "eval" / "metrics.json").read_text())
    saft = next(a for a in doc["aggregates"] if a["model"] == "saft")
    groups = saft["base_to_new"]
    assert set(groups) == {"dtd", "eurosat"}
    base = (groups["dtd"]["base"]["mean"] + groups["eurosat"]["base"]["mean"]) / 2
    new = (groups["dtd"]["new"]["mean"] + groups["eurosat"]["new"]["mean"]) / 2
    assert saft["hm"]["mean"] == pytest.approx(harmonic_mean(base, new))
    from saft.orchestration.eval_tasks import base_to_new_trainings

    fan_out = base_to_new_trainings("", str(tmp_path / "suite.yaml"), str(coop_root))
    assert [(t["name"], t["root"], t["entries"]) for t in fan_out] == [
        (ds, str(coop_root / DEFAULT_FOLDERS[ds]), [f"{ds}/base", f"{ds}/new"]) for ds in ("dtd", "eurosat")]


@pytest.mark.slow
def test_cross_dataset_from_imagenet_to_the_ten_coop_datasets(coop_root, tmp_path, monkeypatch):
    """Train on ImageNet (all 1000 classes), evaluate the ten others; the gate's OOD mean is over them."""
    from saft.data.adapters.adapter import DatasetAdapter
    from saft.data.prepare import prepare_dataset
    from saft.steps.configs import FinetuneStepConfig
    from saft.steps.collect import collect_step
    from saft.steps.evaluate import DeltaRun, EvaluateConfig, evaluate_suite
    from saft.steps.finetune import finetune_step
    from saft.steps.register import select_aggregate
    from saft.steps.score import ScoreConfig, score_step
    from saft.tracking.promotion import GateRule, Scores, decide

    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    # one prompt per class (ImageNet's 80 would cost minutes of text tower here; the protocol is the same)
    templates = DatasetAdapter.templates
    monkeypatch.setattr(DatasetAdapter, "templates", property(lambda self: templates.fget(self)[:1]))
    model, run = "saft-tiny-vit", tmp_path / "run"
    write_imagenet(coop_root / DEFAULT_FOLDERS["imagenet"], 1, ["n01440764", "n15075141"])
    data = run / "seed1" / "data"
    prepare_dataset(coop_root / DEFAULT_FOLDERS["imagenet"], data, dataset="imagenet", shots=1, seed=1, val_shots=0)
    assert len(json.loads((data / "classes.json").read_text())) == 1000  # all classes
    # a random mask: this test is about the protocol, not about scoring 1000 images
    score_step(ScoreConfig(model=model, density=0.01, kind="random", seed=1), data, run / "seed1" / "mask",
               log=None, progress=False)
    finetune_step(FinetuneStepConfig(model=model, method="random", steps=1, batch_size=16, lr=1e-2, seed=1), data,
                  run / "seed1" / "random", mask_path=run / "seed1" / "mask" / "mask.safetensors", progress=False,
                  log=None)
    deltas = [DeltaRun("random", str(run / "seed1" / "random" / "delta.safetensors"), 1)]
    # the fixture's datasets are drawn by one generator, so their images repeat byte for byte across datasets
    evaluate_suite(EvaluateConfig(model=model, deltas=deltas, allow_train_overlap=True),
                   load_suite("cross-dataset", str(coop_root)),
                   run / "parts", progress=False, log=lambda *_: None)
    collect_step([run / "parts"], run / "eval", deltas=deltas)
    doc = json.loads((run / "eval" / "metrics.json").read_text())
    tuned = select_aggregate(doc, "random", 1.0, gate="id_ood")  # what the register step hands the gate
    zeroshot = select_aggregate(doc, "zeroshot", None, gate="id_ood")
    ood = [v["mean"] for d, v in tuned["per_dataset"].items() if v["role"] == "ood"]
    assert len(ood) == 10 and set(tuned["per_dataset"]) == {"imagenet", *COOP_DATASETS}
    assert tuned["ood_mean"]["mean"] == pytest.approx(sum(ood) / 10)
    assert tuned["id"]["mean"] == tuned["per_dataset"]["imagenet"]["mean"]
    assert "effective_robustness" not in tuned  # no reference fit for these datasets
    decision = decide(Scores(tuned["id"]["mean"], tuned["ood_mean"]["mean"]),
                      Scores(zeroshot["id"]["mean"], zeroshot["ood_mean"]["mean"]), None, GateRule())
    assert decision.checks[0].candidate == pytest.approx(sum(ood) / 10)


@pytest.mark.slow
def test_fewshot_grid_writes_the_accuracy_vs_shots_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "fewshot"
    code = main(["benchmark", "fewshot", "--out", str(out), "--shots", "1", "2", "--seeds", "1", "--methods", "saft",
                 "--steps", "1", "--pool-per-class", "2", "--test-per-class", "1"])
    assert code == 0
    summary = json.loads((out / "fewshot.json").read_text())
    assert [p["shots"] for p in summary["methods"]["saft"]] == [1, 2]
    assert all(p["id"]["std"] is None for p in summary["methods"]["saft"])  # one seed
    assert summary["zeroshot"]["id"]["mean"] > 0
    assert (out / "fewshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "fewshot.md").read_text()
    assert "1 shots" in table and "±" not in table.split("\n\n")[0]
    prepared = json.loads((out / "shots2" / "seed1" / "data" / "prepare.json").read_text())
    assert prepared["shots"] == 2 and prepared["counts"]["train"] == 20
    with pytest.raises(ValueError, match="pool images per class"):
        from saft.protocols.fewshot import FewShotConfig

        FewShotConfig(shots=(1, 16), pool_per_class=8)
