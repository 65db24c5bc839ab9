"""The compiled Kubeflow pipelines and components, and the cluster client, without a cluster.

Each pipeline's compiled YAML is compared with its checked-in snapshot
(pipelines/<name>/pipeline.yaml), and each component's with components/<name>/
component.yaml and README.md; after a reviewed change regenerate them with
`saft pipeline compile --all` and `saft components compile`. The component files load
with kfp's own loader. The cluster settings of every task (resources, GPU, secrets,
caching, retries, checkpoints, the data version as an input) are read from the compiled
YAML. Submit and schedule talk to a local HTTP endpoint that answers like the KFP API.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fake_kfp import fake_kfp_server, submitted_run

from saft.cli import main
from saft.orchestration.client import compile_pipeline, pipeline_arguments
from saft.images import SNAPSHOT_IMAGE
from saft.orchestration.cluster import TASK_RESOURCES, UNCACHED, ClusterConfig
from saft.orchestration.repository import component_functions, find_repository, pipeline_names
from saft.steps.params import load_params

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("base2new", "benchmark", "retrain")
# What carries the data version into a data-reading task's cache key: the world task's output
# (which records it) or prepare's output (made from that).
DATA_READERS = {"prepare": "world", "evaluate": "world", "score": "data", "finetune": "data", "baseline": "data",
                "select": "data", "finetune_trainjob": "data"}


def _cfg() -> ClusterConfig:
    return ClusterConfig.from_params(load_params(REPO / "params.yaml"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for name in PIPELINES:
        path = compile_pipeline(name, tmp_path_factory.mktemp(name) / "pipeline.yaml", _cfg())
        docs = list(yaml.safe_load_all(path.read_text()))
        out[name] = (path, {"spec": docs[0], "platform": docs[1] if len(docs) > 1 else {}})
    return out


def test_the_repository_holds_the_pipelines_and_the_components() -> None:
    assert find_repository() == REPO
    assert pipeline_names() == sorted(PIPELINES)
    assert set(component_functions(REPO)) == set(TASK_RESOURCES)  # every component has a resource policy


@pytest.mark.parametrize("name", PIPELINES)
def test_compiled_pipeline_matches_the_reviewed_snapshot(compiled, name) -> None:
    path, _ = compiled[name]
    snapshot = REPO / "pipelines" / name / "pipeline.yaml"
    assert snapshot.is_file(), f"no snapshot: run `saft pipeline compile --pipeline {name} --snapshot` and review it"
    assert path.read_text() == snapshot.read_text(), (
        f"the compiled {name} pipeline differs from {snapshot.relative_to(REPO)}; review the change and regenerate "
        "it with `saft pipeline compile --all --snapshot`")
    text = path.read_text()
    for machine in (str(REPO), "/tmp/", "saft_components", "saft_pipelines"):
        assert machine not in text, f"the compiled YAML depends on this machine ({machine!r})"


def test_component_library_matches_its_definitions_and_loads_with_kfp(tmp_path) -> None:
    from kfp import components

    from saft.orchestration.library import compile_components

    fresh = compile_components(SNAPSHOT_IMAGE, tmp_path)
    assert {f.name for f in fresh} == set(component_functions(REPO))
    for folder in fresh:
        checked_in = REPO / "components" / folder.name
        for file in ("component.yaml", "README.md"):
            assert (checked_in / file).is_file(), f"components/{folder.name}/{file} is missing"
            assert (folder / file).read_text() == (checked_in / file).read_text(), (
                f"components/{folder.name}/{file} differs from its definition; run `saft components compile --snapshot`")
        loaded = components.load_component_from_file(str(checked_in / "component.yaml"))
        assert loaded.name == folder.name.replace("_", "-")
        assert loaded.component_spec.implementation.container.image == SNAPSHOT_IMAGE
        inputs = set(loaded.component_spec.inputs or {})
        readme = (checked_in / "README.md").read_text()
        assert all(f"| `{key}` |" in readme for key in inputs), folder.name  # every input documented
        assert "## Resources" in readme


def test_compile_writes_where_told_and_needs_an_image_of_ones_own(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("SAFT_IMAGE", raising=False)
    before = {n: (REPO / "pipelines" / n / "pipeline.yaml").read_bytes() for n in PIPELINES}
    assert main(["pipeline", "compile", "--all", "--params", str(REPO / "params.yaml")]) == 2
    assert "no project image: pass --image REGISTRY/saft:TAG" in capsys.readouterr().err
    assert main(["pipeline", "compile", "--all", "--image", SNAPSHOT_IMAGE]) == 2
    assert "placeholder" in capsys.readouterr().err
    assert main(["pipeline", "compile", "--all", "--image", "registry.example/saft:1", "--out-dir",
                 str(tmp_path / "out"), "--params", str(REPO / "params.yaml")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{n}.yaml" for n in PIPELINES]
    assert "image: registry.example/saft:1" in (tmp_path / "out" / "retrain.yaml").read_text()
    monkeypatch.setenv("SAFT_IMAGE", "registry.example/saft:2")  # a configured default
    assert main(["pipeline", "compile", "--pipeline", "benchmark", "--out", str(tmp_path / "b.yaml")]) == 0
    assert "image: registry.example/saft:2" in (tmp_path / "b.yaml").read_text()
    assert {n: (REPO / "pipelines" / n / "pipeline.yaml").read_bytes() for n in PIPELINES} == before
    assert main(["pipeline", "compile", "--all", "--snapshot", "--image", "x"]) == 2  # snapshots: placeholder only


def test_a_loaded_component_builds_into_a_users_own_pipeline(tmp_path) -> None:
    """What another team does: load two published components and wire them in their pipeline."""
    from kfp import compiler, components, dsl

    version = components.load_component_from_file(str(REPO / "components" / "data_version" / "component.yaml"))
    world = components.load_component_from_file(str(REPO / "components" / "world" / "component.yaml"))

    root = "s3://bucket/images"

    @dsl.pipeline(name="their-pipeline")  # no parameters: this module's annotations are strings
    def theirs():
        v = version(data_root=root, data_rev="", data_repo="", expected="", pool_per_class=4, test_per_class=4,
                    tracking=False)
        world(data_root=root, data_version=v.output, pool_per_class=4, test_per_class=4)

    compiler.Compiler().compile(theirs, str(tmp_path / "theirs.yaml"))
    assert "saft.orchestration.tasks" in (tmp_path / "theirs.yaml").read_text()


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (loops and conditions included): name -> task spec."""
    out = {}
    for comp in [spec["root"]] + list(spec["components"].values()):
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def _component_of(spec: dict, task: dict) -> tuple[str, str, dict] | None:
    """(component function, executor label, container) of a task; None for loops and conditions."""
    component = spec["components"][task["componentRef"]["name"]]
    if "executorLabel" not in component:
        return None
    label = component["executorLabel"]
    container = spec["deploymentSpec"]["executors"][label]["container"]
    args = container["command"] + container.get("args", [])
    return args[args.index("--function_to_execute") + 1], label, container


@pytest.mark.parametrize("name", PIPELINES)
def test_every_task_gets_its_resources_secrets_cache_and_retry_policy(compiled, name) -> None:
    _, docs = compiled[name]
    spec, platform = docs["spec"], docs["platform"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    seen = set()
    for task_name, task in _tasks(spec).items():
        found = _component_of(spec, task)
        if found is None:
            continue
        function, label, container = found
        seen.add(function)
        res = TASK_RESOURCES[function]
        resources = container.get("resources", {})
        assert resources.get("resourceCpuRequest") == res.cpu, task_name  # on every task, not only GPU ones
        assert resources.get("resourceMemoryRequest") == res.memory, task_name
        assert ("accelerator" in resources) == res.gpu, task_name
        assert container["image"] == SNAPSHOT_IMAGE
        settings = k8s[label]
        assert {s["secretName"] for s in settings["secretAsEnv"]} == {"saft-s3", "saft-mlflow"}, task_name
        assert {e["name"]: e["fieldPath"] for e in settings["fieldPathAsEnv"]} == {
            "SAFT_PIPELINE_RUN": "metadata.labels['pipeline/runid']"}, task_name
        if res.gpu:
            assert settings["emptyDirMounts"][0]["mountPath"] == "/dev/shm" and settings["nodeSelector"], task_name
        assert bool(task["cachingOptions"].get("enableCache")) == (function not in UNCACHED), task_name
        if function in ("finetune", "baseline", "finetune_trainjob", "train_method"):
            assert settings["pvcMount"][0]["mountPath"] == "/mnt/saft-checkpoints", task_name
        if function not in ("start_run", "finish_run"):
            assert task["retryPolicy"]["maxRetryCount"] == 2, task_name
        if function == "world":  # the cache key follows the data
            assert "data_version" in task["inputs"]["parameters"], task_name
        if function in DATA_READERS:
            assert DATA_READERS[function] in task["inputs"]["artifacts"], task_name
        # no task of a pipeline run takes a per-run input: that would defeat every cache
        assert "run" not in task.get("inputs", {}).get("artifacts", {}), task_name
    expected = {"benchmark": {"train_method", "gather_seed", "gather_deltas", "protocol"}, "retrain": {"select", "baseline", "compare", "deploy", "finetune_trainjob"},
                "base2new": {"protocol", "base2new_trainings", "collect_base2new"}}[name]
    assert expected <= seen


def test_the_retrain_dag_trains_a_grid_selects_and_gates(compiled) -> None:
    _, docs = compiled["retrain"]
    spec = docs["spec"]
    tasks = _tasks(spec)
    loops = [t for t in tasks.values() if "parameterIterator" in t]
    grid = next(t for t in loops if t["parameterIterator"]["items"]["inputParameter"].endswith("lr_grid"))
    assert grid["iteratorPolicy"]["parallelismLimit"] == 2  # cluster.parallelism
    assert all(t["iteratorPolicy"]["parallelismLimit"] == 2 for t in loops)  # every fan-out is limited
    conditions = {t["triggerPolicy"]["condition"] for t in tasks.values() if "triggerPolicy" in t
                  and "condition" in t["triggerPolicy"]}
    assert any("register_enabled" in c and "true" in c for c in conditions)
    assert any("with_baselines" in c for c in conditions)
    assert any("verdict" in c and "promoted" in c for c in conditions)  # deploy only on promotion
    version = next(t for t in tasks.values() if t["taskInfo"]["name"] == "data-version")
    assert not version["cachingOptions"].get("enableCache")
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["lr_grid"]["defaultValue"] == [0.001, 0.003, 0.01]
    assert params["with_baselines"]["defaultValue"] is False


def test_the_retrain_dag_trains_across_nodes_when_nodes_is_above_one(compiled) -> None:
    _, docs = compiled["retrain"]
    spec = docs["spec"]
    tasks = _tasks(spec)
    branch = {t["taskInfo"]["name"]: t for t in tasks.values() if "nodes" in str(t.get("triggerPolicy", {}))}
    assert branch["multi-node"]["triggerPolicy"]["condition"] == "int(inputs.parameter_values['pipelinechannel--nodes']) > 1"
    assert branch["one-node"]["triggerPolicy"]["condition"].startswith("!(")  # the else branch

    def functions_under(task: dict) -> set[str]:
        found, todo = set(), [task]
        while todo:
            t = todo.pop()
            hit = _component_of(spec, t)
            if hit:
                found.add(hit[0])
            todo += spec["components"][t["componentRef"]["name"]].get("dag", {}).get("tasks", {}).values()
        return found

    assert functions_under(branch["multi-node"]) == {"finetune_trainjob", "select"}
    assert functions_under(branch["one-node"]) == {"finetune", "select"}
    launcher = next(t for t in tasks.values() if t["taskInfo"]["name"] == "finetune-trainjob")
    given = launcher["inputs"]["parameters"]
    assert given["pvc"]["runtimeValue"]["constant"] == "saft-checkpoints"  # the shared volume, compiled in
    assert given["nodes"]["componentInputParameter"].endswith("nodes")
    assert given["gpus_per_node"]["componentInputParameter"].endswith("gpu_count")
    assert given["shared_root"]["componentInputParameter"].endswith("checkpoint_root")
    # downstream tasks take whichever branch ran (dsl.OneOf)
    collect = next(t for t in tasks.values() if t["taskInfo"]["name"] == "collect")
    assert "oneof" in json.dumps(collect["inputs"]["artifacts"]["deltas"])
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["nodes"]["defaultValue"] == 1
    assert json.loads(params["trainjob_settings"]["defaultValue"])["runtime"] == "torch-distributed"


def test_compiled_yaml_holds_no_credentials(compiled) -> None:
    for path, _ in compiled.values():
        text = path.read_text()
        for needle in ("AKIA", "aws_secret_access_key=", "password:", "token:"):
            assert needle not in text


def test_params_become_pipeline_arguments() -> None:
    params = load_params(REPO / "params.yaml", ["finetune.steps=7", "finetune.warmup_steps=1", "seeds=[4, 5]",
                                                "finetune.lr.saft=0.02", "finetune.grad_accum=2",
                                                "finetune.lr_grid.lora=[0.001, 0.003]",
                                                "finetune.methods=[zeroshot, full, lora, saft]",
                                                "finetune.precision=bf16", "loader.num_workers=3",
                                                "finetune.checkpoint_every=5", "finetune.batch_size=12"])
    args = pipeline_arguments("benchmark", params)
    assert args["seeds"] == [4, 5] and args["train_methods"] == ["full", "lora", "saft"] and args["zeroshot"]
    assert json.loads(args["lr_grids"]) == {"full": [params.learning_rates()["full"]], "lora": [0.001, 0.003],
                                            "saft": [0.02]}
    assert args["wiseft_alphas"] == []  # wiseft is not compared
    assert pipeline_arguments("benchmark", load_params(REPO / "params.yaml"))["wiseft_alphas"] == [
        round(0.1 * i, 1) for i in range(11)]
    # every finetune setting reaches the components, in one JSON object
    settings = json.loads(args["settings"])
    assert {k: settings[k] for k in ("steps", "grad_accum", "precision", "num_workers", "checkpoint_every",
                                     "batch_size")} == {"steps": 7, "grad_accum": 2, "precision": "bf16",
                                                                "num_workers": 3, "checkpoint_every": 5,
                                                                "batch_size": 12}
    assert json.loads(args["params_json"])["finetune"]["steps"] == 7
    assert "checkpoint_root" not in args  # a cluster run keeps the compiled default (the PVC)
    subset = pipeline_arguments("benchmark", load_params(REPO / "params.yaml", ["finetune.methods=[saft, full]"]))
    assert subset["train_methods"] == ["saft", "full"] and subset["zeroshot"] is False  # any subset runs
    with pytest.raises(ValueError, match="registers the saft delta"):
        pipeline_arguments("benchmark", load_params(REPO / "params.yaml", ["register.method=full"]))
    retrain = pipeline_arguments("retrain", load_params(REPO / "params.yaml", [
        "retrain.lr_grid=[0.01, 0.1]", "retrain.baselines=[full]", "register.enabled=false", "data.rev=abc123",
        "finetune.epochs=3"]))
    assert retrain["lr_grid"] == [0.01, 0.1] and retrain["baselines"] == [{"method": "full", "lr": 1e-4}]
    assert retrain["with_baselines"] is True and retrain["register_enabled"] is False
    assert retrain["data_rev"] == "abc123" and json.loads(retrain["settings"])["epochs"] == 3.0
    with pytest.raises(ValueError, match="no pipeline 'nightly'"):
        pipeline_arguments("nightly", params)


@pytest.fixture
def fake_kfp(monkeypatch):
    with fake_kfp_server(monkeypatch) as server:
        yield server


def test_submit_sends_the_compiled_pipeline_with_params_and_token(fake_kfp, compiled, monkeypatch, capsys) -> None:
    host, requests = fake_kfp
    monkeypatch.setenv("KFP_TOKEN", "tok-123")
    package, _ = compiled["benchmark"]
    code = main(["pipeline", "submit", "--host", host, "--package", str(package), "--params",
                 str(REPO / "params.yaml"), "--set", "finetune.steps=9", "--set", "finetune.warmup_steps=0",
                 "--experiment", "nightly", "--run-name", "retrain-abc"])
    assert code == 0
    assert "run-42" in capsys.readouterr().out
    run = submitted_run(requests)
    assert run["display_name"] == "retrain-abc" and run["experiment_id"] == "exp-1"
    assert json.loads(run["runtime_config"]["parameters"]["settings"])["steps"] == 9
    spec = run["pipeline_spec"]
    spec = spec.get("pipeline_spec", spec)  # with platform settings the spec is wrapped
    assert spec["pipelineInfo"]["name"] == "saft-benchmark"
    assert requests and all(r["headers"].get("authorization") == "Bearer tok-123" for r in requests)
    created = [r for r in requests if r["method"] == "POST" and "experiments" in r["path"]]
    assert created and created[0]["body"]["display_name"] == "nightly"


def test_schedule_creates_a_recurring_retrain_run(fake_kfp, compiled, monkeypatch, capsys) -> None:
    host, requests = fake_kfp
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    package, _ = compiled["retrain"]
    code = main(["pipeline", "schedule", "--host", host, "--package", str(package), "--cron", "0 3 * * *",
                 "--name", "nightly-saft", "--params", str(REPO / "params.yaml"), "--set", "data.root=s3://b/images"])
    assert code == 0
    assert "the retrain pipeline" in capsys.readouterr().out
    job = next(r for r in requests if r["path"].startswith("/apis/v2beta1/recurringruns"))["body"]
    assert job["display_name"] == "nightly-saft"
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert job["max_concurrency"] in (1, "1")
    parameters = job["runtime_config"]["parameters"]
    # no data version in the arguments: each scheduled run resolves it when it starts
    assert parameters["lr_grid"] == [0.001, 0.003, 0.01] and parameters["data_version"] == ""
    assert parameters["data_root"] == "s3://b/images"
    spec = job["pipeline_spec"]
    assert spec.get("pipeline_spec", spec)["pipelineInfo"]["name"] == "saft-retrain"


def test_bad_cron_and_missing_package_are_clear_errors(fake_kfp, tmp_path, capsys) -> None:
    host, _ = fake_kfp
    assert main(["pipeline", "schedule", "--host", host, "--cron", "every night", "--image", "registry.example/saft:1",
                 "--params", str(REPO / "params.yaml")]) == 2
    assert "cron expression" in capsys.readouterr().err
    assert main(["pipeline", "submit", "--host", host, "--package", str(tmp_path / "none.yaml"), "--params",
                 str(REPO / "params.yaml")]) == 2
    assert "saft pipeline compile --pipeline benchmark" in capsys.readouterr().err


def test_an_unreachable_kfp_host_is_one_line(tmp_path, capsys) -> None:
    from services import free_port

    host = f"http://127.0.0.1:{free_port()}/pipeline"  # nothing listens there
    code = main(["pipeline", "submit", "--host", host, "--image", "registry.example/saft:1", "--params",
                 str(REPO / "params.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"saft: error: submitting the benchmark pipeline at {host} failed") and "--host" in err[0]
