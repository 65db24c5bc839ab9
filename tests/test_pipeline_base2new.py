"""The base2new pipeline: its fan-out, its compiled DAG, and a kfp.local run on the world's base-to-new variant.

- The fan-out: one training per dataset of a base-to-new suite (each on its own suite root,
  outside the run's data version), one for the world's synthshift-b2n (on the pool, checked).
- The DAG: the trainings loop over the fan-out's output; inside it prepare takes subset base
  and evaluate the item's dataset (both halves); nothing is registered.
- kfp.local end to end (about a minute and a half on two cores): base, new and HM per dataset
  in the results, the training drawn from the base classes only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from saft.cli import main
from saft.orchestration.client import compile_pipeline, pipeline_arguments
from saft.orchestration.cluster import ClusterConfig
from saft.orchestration.publish import headline_metrics
from saft.steps.params import load_params

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.subset=base", "seeds=[1]", "world.pool_per_class=26", "world.test_per_class=8", "finetune.steps=6",
        "finetune.warmup_steps=1", "score.batch_size=16", "finetune.batch_size=16"]


@pytest.fixture(scope="module")
def b2n_world(tmp_path_factory) -> Path:
    from saft.steps.params import WorldParams
    from saft.steps.world import world_step

    root = tmp_path_factory.mktemp("world")
    world_step(root, WorldParams(26, 8), log=lambda *_: None)
    return root


def test_the_fan_out_trains_once_per_dataset(b2n_world, tmp_path) -> None:
    from saft.eval.suites import load_suite
    from saft.orchestration.eval_tasks import base2new_fanout, entries_of

    entries = [{"name": f"{ds}/{half}", "dataset": "imagefolder", "root": f"{ds}/test", "role": half}
               for ds in ("dtd", "eurosat") for half in ("base", "new")]
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"name": "b2n-two", "datasets": entries}))
    two = base2new_fanout("", str(tmp_path / "suite.yaml"), str(tmp_path), dataset="imagefolder", data_root="")
    assert [(t["group"], t["dataset"], t["version_check"]) for t in two] == [("dtd", "imagefolder", False),
                                                                             ("eurosat", "imagefolder", False)]
    assert two[0]["root"].endswith("dtd/test")  # the dataset's own suite root
    # the world's base-to-new variant: one dataset, trained on the world's pool as in the other pipelines
    one = base2new_fanout(str(b2n_world), "", "", dataset="imagefolder", data_root="")
    assert one == [{"group": "photo", "dataset": "imagefolder", "root": "", "version_check": True}]
    suite = load_suite(str(tmp_path / "suite.yaml"), str(tmp_path))
    assert entries_of(suite, "eurosat") == ["eurosat/base", "eurosat/new"]  # a group: both halves
    assert entries_of(suite, "dtd/new") == ["dtd/new"] and entries_of(suite, "") == []
    with pytest.raises(ValueError, match="no entry or base-to-new group 'flowers'"):
        entries_of(suite, "flowers")
    from saft.steps.params import ParamsError

    with pytest.raises(ParamsError, match="needs a base-to-new suite"):
        base2new_fanout(str(b2n_world), "synthshift", "", dataset="imagefolder", data_root="")


def test_arguments_need_the_base_subset_and_leave_out_registration() -> None:
    with pytest.raises(ValueError, match="data.subset: base"):
        pipeline_arguments("base2new", load_params(REPO / "params.yaml"))
    args = pipeline_arguments("base2new", load_params(REPO / "params.yaml", ["data.subset=base", "seeds=[4, 5]"]))
    assert args["seed"] == 4 and args["data_subset"] == "base" and args["lr_saft"] == load_params(REPO / "params.yaml").finetune.lr["saft"]
    assert not {"register_enabled", "promote", "split"} & set(args)


def test_the_compiled_dag_loops_over_the_fan_out(tmp_path) -> None:
    path = compile_pipeline("base2new", tmp_path / "pipeline.yaml",
                            ClusterConfig.from_params(load_params(REPO / "params.yaml")))
    spec = next(yaml.safe_load_all(path.read_text()))
    tasks = {}
    for comp in [spec["root"]] + list(spec["components"].values()):
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    loop = next(t for t in tasks.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("base2new-trainings-Output")
    assert tasks["prepare"]["inputs"]["parameters"]["subset"]["componentInputParameter"] == "pipelinechannel--data_subset"
    evaluate = tasks["evaluate"]["inputs"]["parameters"]
    assert evaluate["dataset"]["parameterExpressionSelector"] == 'parseJson(string_value)["group"]'
    assert "register" not in tasks and "deploy" not in tasks
    assert {"protocol", "collect-base2new", "finish-run"} <= set(tasks)


def test_the_headline_has_hm_per_dataset_and_averaged() -> None:
    summary = {"aggregates": [{"model": "saft", "alpha": 1.0, "base": {"mean": 0.8}, "new": {"mean": 0.6},
                               "hm": {"mean": 0.68}, "base_to_new": {
                                   "dtd": {"base": {"mean": 0.9}, "new": {"mean": 0.5}, "hm": {"mean": 0.642857}},
                                   "eurosat": {"base": {"mean": 0.7}, "new": {"mean": 0.7}, "hm": {"mean": 0.7}}}}]}
    assert headline_metrics(summary) == {"saft_hm": 0.68, "saft_dtd_hm": 0.642857, "saft_eurosat_hm": 0.7}


@pytest.mark.slow
def test_base2new_end_to_end_on_the_worlds_base_to_new_variant(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["pipeline", "run", "--local", "--pipeline", "base2new", "--no-tracking", "--params",
            str(REPO / "params.yaml"), "--out", str(tmp_path / "out")]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    text = capsys.readouterr().out
    ran = sorted(m.group(1) for m in re.finditer(r"^  task +\d+ (\S+): success", text, re.MULTILINE))
    assert ran == sorted(["start-run", "data-version", "world", "protocol", "base2new-trainings", "prepare", "score",
                          "finetune", "evaluate", "collect-base2new", "finish-run"])
    run_dir = next((tmp_path / "out" / "kfp").glob("saft-base2new-*"))
    prepared = json.loads(next(run_dir.glob("for-loop-*/prepare/data/prepare.json")).read_text())
    assert prepared["subset"] == "base" and prepared["counts"]["classes"] == 5  # the first 5 of the 10 shapes
    results = json.loads((run_dir / "collect-base2new" / "results" / "results.json").read_text())
    saft = next(a for a in results["aggregates"] if a["model"] == "saft")
    photo = saft["base_to_new"]["photo"]
    b, n = photo["base"]["mean"], photo["new"]["mean"]
    assert photo["hm"]["mean"] == pytest.approx(2 * b * n / (b + n)) and saft["hm"]["mean"] == pytest.approx(
        2 * saft["base"]["mean"] * saft["new"]["mean"] / (saft["base"]["mean"] + saft["new"]["mean"]))
    assert set(saft["per_dataset"]) == {"photo/base", "photo/new"}
    assert "HM" in text
