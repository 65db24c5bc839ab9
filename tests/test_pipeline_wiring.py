"""params.yaml settings reach the step functions through the pipelines and their components.

Each component body is called as the pod would (artifacts as objects with a ``path``), with
the task function it calls replaced by a recorder, so the test reads exactly what the
component hands on; the pipeline arguments are built from params.yaml with overrides.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from saft.orchestration.client import pipeline_arguments
from saft.orchestration.repository import component_functions
from saft.steps.params import load_params
from saft.loader import LoaderSettings
from saft.orchestration.tasks import settings_config

REPO = Path(__file__).resolve().parents[1]
LOADER = ["loader.num_workers=3", "loader.pin_memory=false", "loader.persistent_workers=false"]


def _record(monkeypatch, name: str, module: str = "tasks") -> list:
    """Replace ``saft.orchestration.<module>.<name>`` by a recorder of its arguments."""
    import importlib

    tasks = importlib.import_module(f"saft.orchestration.{module}")
    calls = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        return {"verdict": "promoted"} if name == "register_task" else "hash"

    monkeypatch.setattr(tasks, name, recorder)
    return calls


def _art(tmp_path: Path, name: str) -> SimpleNamespace:
    (tmp_path / name).mkdir(exist_ok=True)
    return SimpleNamespace(path=str(tmp_path / name))


def test_the_loader_section_as_json_is_checked_and_takes_integral_floats() -> None:
    assert settings_config(LoaderSettings, "") == LoaderSettings() == settings_config(LoaderSettings, "{}")
    assert settings_config(LoaderSettings, '{"num_workers": 2.0, "pin_memory": false}') == LoaderSettings(2, False)
    assert isinstance(settings_config(LoaderSettings, {"num_workers": 4.0}).num_workers, int)  # a protobuf Struct
    with pytest.raises(ValueError, match=r"unknown key workers \(did you mean num_workers\?\)"):
        settings_config(LoaderSettings, '{"workers": 2}')
    with pytest.raises(ValueError, match="must be a mapping"):
        settings_config(LoaderSettings, "[1]")


@pytest.mark.parametrize("pipeline", ["benchmark", "retrain"])
def test_score_evaluate_and_prepare_settings_become_pipeline_arguments(pipeline: str) -> None:
    params = load_params(REPO / "params.yaml", LOADER + ["score.prompts=eval", "score.text_batch=64",
                                                         "data.train_templates=['a sketch of a {}.']"])
    args = pipeline_arguments(pipeline, params)
    assert json.loads(args["loader"]) == {"num_workers": 3, "pin_memory": False, "persistent_workers": False}
    assert (args["score_prompts"], args["score_text_batch"]) == ("eval", 64)
    assert args["train_templates"] == ["a sketch of a {}."]
    # finetune and baseline read the same loader section inside their settings
    settings = json.loads(args["settings"])
    assert (settings["num_workers"], settings["pin_memory"], settings["persistent_workers"]) == (3, False, False)


def test_the_score_component_hands_prompts_text_batch_and_loader_to_the_step(tmp_path, monkeypatch) -> None:
    calls = _record(monkeypatch, "score_task")
    score = component_functions(REPO)["score"]
    score(model="tiny", data=_art(tmp_path, "data"), kind="saft", density=0.01, rule="abs_mean", batch_size=8,
          seed=2, device="cpu", tracking=False, mask=_art(tmp_path, "mask"), prompts="eval", text_batch=16,
          loader='{"num_workers": 0, "pin_memory": false, "persistent_workers": false}')
    (data_dir, _, cfg, _), _ = calls[0]
    assert (cfg.prompts, cfg.text_batch, cfg.num_workers, cfg.pin_memory, cfg.persistent_workers) == (
        "eval", 16, 0, False, False)
    assert (cfg.seed, cfg.batch_size, data_dir) == (2, 8, str(tmp_path / "data"))


def test_the_evaluate_component_hands_the_loader_to_the_task(tmp_path, monkeypatch) -> None:
    calls = _record(monkeypatch, "evaluate_task", "eval_tasks")
    evaluate = component_functions(REPO)["evaluate"]
    evaluate(model="tiny", world=_art(tmp_path, "world"), suite="", data_root="", dataset="sketch", alphas=[1.0],
             batch_size=4, device="cpu", tracking=False, deltas=_art(tmp_path, "deltas"),
             metrics=_art(tmp_path, "metrics"), loader='{"num_workers": 1}', reference="none", subset="base")
    _, kwargs = calls[0]
    assert settings_config(LoaderSettings, kwargs["loader"]).num_workers == 1
    assert (kwargs["reference"], kwargs["subset"]) == ("none", "base")


def test_the_evaluate_task_builds_its_config_with_the_loader(tmp_path, monkeypatch) -> None:
    from saft.orchestration import eval_tasks as tasks
    from saft.steps import evaluate

    seen = {}
    monkeypatch.setattr(tasks, "resolve_suite", lambda *a, **k: "suite")
    monkeypatch.setattr(tasks, "entries_of", lambda suite, dataset: [dataset])
    monkeypatch.setattr(tasks, "delta_runs", lambda d: [])
    monkeypatch.setattr(evaluate, "evaluate_suite", lambda cfg, suite, out, **k: seen.setdefault("cfg", cfg) and {})
    tasks.evaluate_task("tiny", str(tmp_path), "", "", "sketch", str(tmp_path), str(tmp_path / "out"), alphas=[1.0],
                        batch_size=4, loader='{"num_workers": 0, "persistent_workers": false}', reference="none")
    cfg = seen["cfg"]
    assert (cfg.num_workers, cfg.persistent_workers, cfg.pin_memory, cfg.reference, cfg.only) == (
        0, False, True, "none", ["sketch"])


def test_the_prepare_component_hands_train_templates_and_subset_to_the_task(tmp_path, monkeypatch) -> None:
    calls = _record(monkeypatch, "prepare_task")
    prepare = component_functions(REPO)["prepare"]
    common = {"world": _art(tmp_path, "world"), "data_root": "", "dataset": "imagefolder", "split": "", "shots": 2,
              "val_shots": 1, "seed": 1, "data_rev": "", "data_repo": "", "tracking": False,
              "data": _art(tmp_path, "data")}
    prepare(**common, train_templates=["a sketch of a {}."], subset="base")
    prepare(**common)  # a user's own pipeline that names neither: the dataset's prompt, every class
    assert [(c[0][2].train_templates, c[0][2].subset) for c in calls] == [(["a sketch of a {}."], "base"), ([], "all")]


def test_the_register_component_hands_the_gate_and_hm_tolerance_to_the_task(tmp_path, monkeypatch) -> None:
    calls = _record(monkeypatch, "register_task", "release_tasks")
    register = component_functions(REPO)["register"]
    out = register(model="tiny", results=_art(tmp_path, "results"), deltas=_art(tmp_path, "deltas"), method="saft",
                   model_name="saft-tiny", promote=True, ood_tolerance=0.01, id_tolerance=0.01, baseline=True,
                   tracking=False, decision=_art(tmp_path, "decision"), gate="hm", hm_tolerance=0.03)
    _, kwargs = calls[0]
    assert (kwargs["gate"], kwargs["hm_tolerance"], out.verdict) == ("hm", 0.03, "promoted")


@pytest.mark.parametrize("pipeline", ["benchmark", "retrain"])
def test_the_protocol_settings_become_pipeline_arguments(pipeline: str) -> None:
    params = load_params(REPO / "params.yaml", ["data.subset=base", "evaluate.reference=none", "register.gate=hm",
                                                "register.hm_tolerance=0.02"])
    args = pipeline_arguments(pipeline, params)
    assert (args["data_subset"], args["eval_reference"], args["register_gate"], args["hm_tolerance"]) == (
        "base", "none", "hm", 0.02)


def test_the_protocol_task_checks_the_pipelines_own_arguments(tmp_path) -> None:
    from saft.orchestration.eval_tasks import protocol_check
    from saft.steps.params import ParamsError, WorldParams
    from saft.steps.world import world_step

    world_step(tmp_path, WorldParams(4, 2), log=lambda *_: None)
    common = {"eval_data_root": "", "dataset": "imagefolder", "data_root": "", "gate": "auto"}
    assert protocol_check(str(tmp_path), suite="", subset="base", register_enabled=True, **common) == "hm"
    assert protocol_check(str(tmp_path), suite="", subset="all", register_enabled=True, **common) == "id_ood"
    assert protocol_check(str(tmp_path), suite="", subset="base", register_enabled=False, **common) == ""
    with pytest.raises(ParamsError, match="data.subset: base"):
        protocol_check(str(tmp_path), suite="synthshift-b2n", subset="all", register_enabled=True, **common)
    with pytest.raises(ParamsError, match="register.gate: auto"):
        protocol_check(str(tmp_path), suite="", subset="all", register_enabled=True,
                       **{**common, "gate": "hm"})


def test_the_trainjob_component_hands_nodes_volume_and_settings_to_the_launcher(tmp_path, monkeypatch) -> None:
    calls = _record(monkeypatch, "finetune_trainjob_task", module="trainjob_task")
    args = pipeline_arguments("retrain", load_params(REPO / "params.yaml", ["cluster.nodes=2", "cluster.gpu_count=4",
                                                                            "finetune.batch_size=16"]))
    assert args["nodes"] == 2 and args["gpu_count"] == 4
    fn = component_functions(REPO)["finetune_trainjob"]
    fn(model="tiny", data=_art(tmp_path, "d"), mask=_art(tmp_path, "m"), lr=0.01, settings=args["settings"], seed=1,
       nodes=args["nodes"], gpus_per_node=args["gpu_count"], shared_root="/mnt/saft-checkpoints", pvc="saft-checkpoints",
       trainjob=args["trainjob_settings"], image="img", tracking=False, delta=_art(tmp_path, "out"))
    (positional, kwargs), = calls
    cfg = positional[3]
    assert (cfg.method, cfg.lr, cfg.batch_size, cfg.model, cfg.device) == ("saft", 0.01, 16, "tiny", "cuda")
    assert (kwargs["nodes"], kwargs["gpus_per_node"], kwargs["pvc"]) == (2, 4, "saft-checkpoints")
    assert json.loads(kwargs["settings"])["runtime"] == "torch-distributed" and kwargs["image"] == "img"


def test_nodes_above_one_is_checked_and_refused_by_the_local_runner(tmp_path) -> None:
    from saft.orchestration.local import run_local
    from saft.steps.params import ParamsError

    with pytest.raises(ParamsError, match="must divide by cluster.nodes x cluster.gpu_count"):
        load_params(REPO / "params.yaml", ["cluster.nodes=2", "cluster.gpu_count=3"]).validate()
    with pytest.raises(ParamsError, match="needs cluster.checkpoint_pvc"):
        load_params(REPO / "params.yaml", ["cluster.nodes=2", "cluster.checkpoint_pvc="]).validate()
    params = load_params(REPO / "params.yaml", ["cluster.nodes=2", "cluster.gpu_count=1"])
    with pytest.raises(ValueError, match="needs Kubeflow Trainer on a cluster"):
        run_local(params, tmp_path / "out", pipeline="retrain")
    assert not (tmp_path / "out").exists()  # refused before anything is written
