"""The retrain pipeline under kfp.local, on the smallest setting that still means something.

- End to end, tracked: one seed, two learning rates, the rate chosen on ID validation,
  a two-dataset suite, the registry and its gate, the data version in the lineage.
- Run again over unchanged data (kfp.local's cache on): every deterministic task is served
  from cache, only the never-cached ones (start-run, data-version, register, finish-run) run.
- New data under the same root: the data-version task reports another version, and the
  tasks that the unchanged run served from cache (world, which records the version, and
  prepare) run again, so by the cache keys does everything downstream of them.
- A finetune task killed mid-training (SIGKILL from outside, as a node loss would) is
  retried by kfp.local and resumes from its last checkpoint, ending with the same delta
  as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from image_trees import write_image

from saft.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["finetune.steps=6", "finetune.warmup_steps=1", "score.batch_size=16", "finetune.batch_size=16",
        "retrain.lr_grid=[0.003, 0.01]", "finetune.checkpoint_every=3"]
NEVER_CACHED = {"start-run", "data-version", "register", "finish-run", "deploy"}


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory) -> Path:
    """The embedded world at a small size, rendered once, plus a suite of two of its test sets."""
    from saft.steps.params import WorldParams
    from saft.steps.world import world_step

    root = tmp_path_factory.mktemp("world")
    world_step(root, WorldParams(26, 8), log=lambda *_: None)
    suite = {"name": "synth-mini", "datasets": [
        {"name": "photo", "dataset": "imagefolder", "root": "photo/test", "role": "id"},
        {"name": "sketch", "dataset": "imagefolder", "root": "sketch/test", "role": "ood"}]}
    (root / "mini-suite.yaml").write_text(yaml.safe_dump(suite))
    return root


def _task_lines(text: str) -> dict[str, list[str]]:
    """status -> task names, from the terminal's task lines."""
    lines: dict[str, list[str]] = {}
    for match in re.finditer(r"^  task +\d+ (\S+): (\w+)", text, re.M):
        lines.setdefault(match.group(2), []).append(match.group(1))
    return lines


def _mlflow(tmp_path: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")


@pytest.mark.slow
def test_retrain_end_to_end_then_from_cache_then_recomputed_on_new_data(mini_world, tmp_path, monkeypatch,
                                                                         capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SAFT_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pool = shutil.copytree(mini_world / "photo" / "pool", tmp_path / "pool")
    args = ["pipeline", "run", "--local", "--pipeline", "retrain", "--cache", "--params", str(REPO / "params.yaml"),
            "--out", str(tmp_path / "out")]
    for item in TINY + [f"data.root={pool}", f"evaluate.suite={mini_world / 'mini-suite.yaml'}",
                        f"evaluate.data_root={mini_world}"]:
        args += ["--set", item]

    assert main(args) == 0
    text = capsys.readouterr().out
    ran = _task_lines(text)
    assert sorted(ran["success"]) == sorted(
        ["start-run", "data-version", "world", "protocol", "prepare", "score", "finetune", "finetune", "select",
         "suite-datasets", "evaluate", "evaluate", "collect", "register", "finish-run"]
        + (["deploy"] if "deploy: " in text else []))
    kfp = tmp_path / "out" / "kfp"
    run_dir = next(kfp.glob("saft-retrain-*"))
    selection = json.loads((run_dir / "select" / "chosen" / "selection.json").read_text())
    assert [c["lr"] for c in selection["candidates"]] == [0.003, 0.01] and selection["val_images"] == 80
    best = max(selection["candidates"], key=lambda c: (c["val_top1"], -c["lr"]))
    assert selection["chosen_lr"] == best["lr"]
    chosen = json.loads((run_dir / "select" / "chosen" / "saft-seed1" / "finetune.json").read_text())
    assert chosen["config"]["lr"] == selection["chosen_lr"] and chosen["config"]["checkpoint_every"] == 3
    results = json.loads((run_dir / "collect" / "results" / "results.json").read_text())
    assert {a["model"] for a in results["aggregates"]} == {"zeroshot", "saft"}  # SAFT alone ships
    assert set(results["aggregates"][0]["per_dataset"]) == {"photo", "sketch"}
    assert results["learning_rates"] == {"saft": selection["chosen_lr"]}
    version = json.loads((run_dir / "prepare" / "data" / "data_version.json").read_text())
    assert version["kind"] == "files" and version["root"] == str(pool)
    decision = json.loads((run_dir / "register" / "decision" / "register.json").read_text())
    assert decision["baseline"]["version"] == "1" and decision["version"] == "2"
    # what the terminal shows: task lines, the table, the selection, the decision
    assert "OOD mean" in text and "(chosen)" in text and "registry: saft-tiny v1" in text
    assert "INFO" not in text and "\x1b[" not in text and "Executing task" not in text

    client = _mlflow(tmp_path)
    registered = client.get_model_version("saft-tiny", "2")
    assert registered.tags["saft.data_version"] == version["version"]
    assert registered.tags["saft.data_kind"] == "files" and registered.tags["saft.data_root"] == str(pool)
    assert float(registered.tags["saft.ood_mean"]) == pytest.approx(
        next(a for a in results["aggregates"] if a["model"] == "saft")["ood_mean"]["mean"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = [r for r in client.search_runs(experiments) if "saft.pipeline_run" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["saft.data_version"] == version["version"]
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == [version["version"].split("-", 1)[1][:32]]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/results.md", "results/register.json"} <= logged
    children = client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {"prepare seed1", "score saft seed1", "select", "collect", "register"} <= {
        r.data.tags["mlflow.runName"] for r in children}

    # the same arguments over the same data: served from cache
    assert main(args) == 0
    again = capsys.readouterr().out
    ran_again = _task_lines(again)
    assert set(ran_again["success"]) <= NEVER_CACHED and {"start-run", "data-version", "register"} <= set(
        ran_again["success"])
    assert sorted(ran_again["cached"]) == sorted(["world", "protocol", "prepare", "score", "finetune", "finetune",
                                                  "select",
                                                  "suite-datasets", "evaluate", "evaluate", "collect"])
    assert again.split("\n\n")[1] == text.split("\n\n")[1]  # the same table
    second = json.loads(sorted(kfp.glob("saft-retrain-*/register/decision/register.json"))[-1].read_text())
    assert second["version"] == "2" and second["created"] is False  # never registered twice

    # the retrain pipeline's data tasks alone, on its cache: served from it while the data is unchanged ...
    arguments = args_of(tmp_path / "out")
    control = _data_pipeline(kfp, arguments, parent.info.run_id)
    assert control == {"ran": ["data-version"], "cached": ["world", "prepare"], "version": version["version"]}
    # ... and recomputed once new data lands under the same root
    write_image(next(pool.iterdir()) / "new-photo.png", 4242, size=(32, 32))
    changed = _data_pipeline(kfp, arguments, parent.info.run_id)
    assert changed["ran"] == ["data-version", "world", "prepare"] and changed["cached"] == []
    assert changed["version"] != version["version"] and changed["version"].startswith("files-")


def args_of(out: Path) -> dict:
    """The arguments the last run passed (read back from the resolved parameters it wrote)."""
    from saft.orchestration.client import pipeline_arguments
    from saft.steps.params import load_params

    return pipeline_arguments("retrain", load_params(out / "params.resolved.yaml"),
                              checkpoint_root=str(out / "checkpoints"))


def _data_pipeline(pipeline_root: Path, a: dict, parent_run_id: str) -> dict:
    """data-version -> world -> prepare, the retrain pipeline's own components and arguments, on its cache."""
    import io

    from kfp import local
    from kfp_pieces import data_pipeline

    from saft.orchestration.tasklog import task_log

    names = ("data_root", "data_rev", "data_repo", "data_version", "pool_per_class", "test_per_class", "dataset",
             "split", "shots", "val_shots", "seed", "tracking", "train_templates", "templates", "skip_corrupt",
             "data_subset")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), enable_caching=True)
    os.environ["SAFT_PARENT_RUN_ID"] = parent_run_id  # the tasks log under the earlier run's parent
    terminal = io.StringIO()
    try:
        with task_log(pipeline_root.parent / "data-only.log") as sink:
            sink._terminal = terminal
            data_pipeline()(**{k: a[k] for k in names})
    finally:
        del os.environ["SAFT_PARENT_RUN_ID"]
    lines = _task_lines(terminal.getvalue())
    run_dir = max(pipeline_root.glob("saft-retrain-data-*"))
    version = json.loads((run_dir / "data-version" / "executor_output.json").read_text())
    return {"ran": lines.get("success", []), "cached": lines.get("cached", []),
            "version": version["parameterValues"]["Output"]}


def test_baselines_train_into_runs_that_gather_and_compare_read(mini_world, tmp_path, monkeypatch) -> None:
    """The retrain pipeline's optional branch, task by task: a random-mask baseline, gathered beside the
    chosen SAFT delta, compared in one table (the DAG around them is checked in test_pipeline_cluster)."""
    from saft.data.prepare import prepare_dataset
    from saft.eval.metrics import Record, metrics_document
    from saft.io import write_json
    from saft.steps.configs import FinetuneStepConfig
    from saft.orchestration.eval_tasks import collect_task
    from saft.orchestration.tasks import baseline_task, delta_runs, gather_deltas

    monkeypatch.delenv("SAFT_PARENT_RUN_ID", raising=False)
    data = tmp_path / "data"
    prepare_dataset(mini_world / "photo" / "pool", data, shots=2, seed=1, val_shots=1)
    cfg = FinetuneStepConfig(model="tiny", method="random", lr=0.01, seed=1, steps=3, batch_size=8, warmup_steps=0,
                             device="cpu")
    baseline_task(str(data), str(tmp_path / "random"), cfg, density=0.01)
    gather_deltas([str(tmp_path / "random")], str(tmp_path / "baselines"))
    (run,) = delta_runs(str(tmp_path / "baselines"))
    assert (run.name, run.seed) == ("random", 1) and not list(tmp_path.glob("random/mask*"))
    for name, models in (("candidate", ("zeroshot", "saft")), ("baseline", ("random",))):
        records = [Record(m, d, role, top1, 10, None if m == "zeroshot" else 1, None if m == "zeroshot" else 1.0)
                   for m in models for d, role, top1 in (("photo", "id", 0.6), ("sketch", "ood", 0.7))]
        write_json(tmp_path / name / "metrics.json", metrics_document(records, {"suite": "synth-mini", "model": "tiny"}))
    saft_run = tmp_path / "chosen" / "saft-seed1"
    saft_run.mkdir(parents=True)
    for f in ("delta.safetensors", "history.json"):
        shutil.copyfile(tmp_path / "random" / f, saft_run / f)
    record = json.loads((tmp_path / "random" / "finetune.json").read_text())
    record["config"].update(method="saft", lr=0.003)
    write_json(saft_run / "finetune.json", record)
    summary = collect_task([str(tmp_path / "candidate"), str(tmp_path / "baseline")],
                           [str(tmp_path / "chosen"), str(tmp_path / "baselines")], str(tmp_path / "compare"))
    assert {a["model"] for a in summary["aggregates"]} == {"zeroshot", "saft", "random"}
    assert summary["learning_rates"] == {"saft": 0.003, "random": 0.01}


def _kill_when_checkpointed(root: Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL the running task process once its first checkpoint is on disk."""
    import psutil

    while not stop.is_set():
        if list(root.glob("finetune-*/checkpoint.pt")):
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "kfp.dsl.executor_main" in " ".join(proc.cmdline()):
                        proc.kill()
                        killed.append(proc.pid)
                except psutil.NoSuchProcess:
                    pass
            if killed:
                return
        time.sleep(0.01)


@pytest.mark.slow
def test_a_training_task_killed_mid_run_resumes_on_its_retry(mini_world, tmp_path, monkeypatch) -> None:
    import torch
    from kfp import dsl, local
    from kfp.dsl import Dataset, Model

    from saft.data.prepare import prepare_dataset
    from saft.orchestration.cluster import ClusterConfig, configure
    from saft.orchestration.repository import load_components
    from saft.sparse import load_delta
    from saft.steps.score import ScoreConfig, score_step
    from saft.steps.configs import FinetuneStepConfig
    from saft.orchestration.tasks import finetune_task

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("SAFT_PARENT_RUN_ID", raising=False)
    data, mask = tmp_path / "data", tmp_path / "mask"
    prepare_dataset(mini_world / "photo" / "pool", data, shots=2, seed=1, val_shots=1)
    score_step(ScoreConfig(model="tiny", density=0.01, batch_size=8), data, mask, progress=False, log=None)
    settings = {"steps": 24, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 4}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the task processes run one thread: the same arithmetic
    try:
        finetune_task(str(data), str(mask), str(tmp_path / "uninterrupted"),
                      FinetuneStepConfig(**settings, model="tiny", method="saft", lr=0.01, seed=1, device="cpu"),
                      log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)

    c, cfg = load_components(ClusterConfig().image), ClusterConfig(kubernetes=False)
    checkpoints = tmp_path / "checkpoints"

    @dsl.pipeline(name="finetune-retried")
    def retried():
        d = dsl.importer(artifact_uri=str(data), artifact_class=Dataset, reimport=False)
        m = dsl.importer(artifact_uri=str(mask), artifact_class=Model, reimport=False)
        task = configure(c.finetune(model="tiny", data=d.output, method="saft", lr=0.01,
                                    settings=json.dumps(settings), seed=1, device="cpu",
                                    checkpoint_root=str(checkpoints), tracking=False, mask=m.output), "finetune", cfg)
        task.set_retry(num_retries=1, backoff_duration="0s")

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    killed, stop = [], threading.Event()
    watcher = threading.Thread(target=_kill_when_checkpointed, args=(checkpoints, killed, stop), daemon=True)
    watcher.start()
    try:
        retried()
    finally:
        stop.set()
        watcher.join(5)
    assert killed, "the task finished before its first checkpoint could be killed"
    out = next((tmp_path / "kfp").glob("finetune-retried-*/finetune/delta"))
    resume = json.loads((out / "resume.json").read_text())
    assert 4 <= resume["resumed_from_step"] < 24 and resume["resumed_from_step"] % 4 == 0
    assert not Path(resume["checkpoint_dir"]).exists()  # removed once the delta was written
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 25))
    resumed, reference = load_delta(out / "delta.safetensors"), load_delta(tmp_path / "uninterrupted" /
                                                                           "delta.safetensors")
    assert resumed.values.keys() == reference.values.keys()
    for name in reference.values:  # bit for bit what an uninterrupted run gives
        assert torch.equal(resumed.values[name], reference.values[name]), name
