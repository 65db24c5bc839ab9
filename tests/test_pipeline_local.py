"""params.yaml, step records (skip re-runs), `saft run` and the kfp.local pipeline, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from saft.cli import main
from saft.steps.configs import DEFAULT_COMPARED as DEFAULT_METHODS
from saft.steps.params import ParamsError, load_params, write_resolved
from saft.steps.record import RECORD_FILE, run_once
from saft.world.task import OOD_DOMAINS

REPO = Path(__file__).resolve().parents[1]
SMALL = ["seeds=[1]", "finetune.steps=6", "finetune.warmup_steps=1", "world.pool_per_class=26", "world.test_per_class=8",
         "score.batch_size=16", "finetune.batch_size=16"]


def test_repository_params_file_loads_and_matches_the_defaults() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.model == "tiny" and params.seeds == [1, 2, 3] and params.embedded
    assert params.finetune.lr == load_params(None).learning_rates()
    assert {m: params.finetune.lr[m] for m in ("saft", "full", "random")} == {"saft": 1e-3, "full": 1e-4, "random": 3e-2}
    assert params.finetune.methods == ["zeroshot", "full", "wiseft", "lora", "saft", "random"]
    assert params.to_dict() == {**load_params(None).to_dict(), "finetune": {
        **load_params(None).to_dict()["finetune"], "lr": params.finetune.lr}}


@pytest.mark.parametrize("override, message", [
    ("finetune.stepz=3", "unknown key finetune.stepz"),
    ("finetune.steps=many", "finetune.steps must be int"),
    ("score.density=0", r"score.density must be in \(0, 1\]"),
    ("finetune.methods=[saft, lorra]", "finetune.methods must be one of zeroshot, full, wiseft, lora, lpft, saft, "
                                       "random, got 'lorra' \\(did you mean lora\\?\\)"),
    ("finetune.methods=[zeroshot, wiseft, saft]", "has wiseft but not full"),
    ("finetune.methods=[zeroshot, wiseft]", "at least one of them trained"),
    ("finetune.lr_grid.lora=[0.001, 0.001]", "finetune.lr_grid.lora must be distinct positive"),
    ("finetune.wiseft_alphas=[0.5, 1.5]", r"wiseft_alphas: WiSE-FT alphas must be distinct mixing weights in \[0, 1\]"),
    ("seeds=[]", "seeds is empty"),
    ("finetune.steps=0", r"finetune.steps must be >= 1, got 0"),
    ("nonsense", "expected KEY=VALUE"),
])
def test_bad_params_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(REPO / "params.yaml", [override])


def test_params_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("finetune:\n  lr: {saft: fast}\n")
    with pytest.raises(ParamsError, match=rf"{bad}.*finetune.lr.saft must be float"):
        load_params(bad)
    with pytest.raises(ParamsError, match="no such parameters file"):
        load_params(tmp_path / "missing.yaml")


def test_overrides_are_typed_and_resolved_params_are_written(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml", ["finetune.lr.saft=1e-3", "seeds=[7]", "data.root=/data/x"])
    assert params.finetune.lr["saft"] == 1e-3 and params.seeds == [7] and not params.embedded
    written = yaml.safe_load(write_resolved(params, tmp_path).read_text())
    assert written["finetune"]["lr"]["saft"] == 1e-3 and written["data"]["root"] == "/data/x"


def test_run_once_skips_same_inputs_and_reruns_on_change(tmp_path: Path) -> None:
    calls = []
    source = tmp_path / "in.txt"
    source.write_text("a")
    out = tmp_path / "out"

    def compute():
        calls.append(1)
        out.mkdir(exist_ok=True)
        (out / "result.txt").write_text(source.read_text() * 2)
        return {"n": len(calls)}

    first = run_once("demo", out, {"k": 1}, [source], ["result.txt"], compute)
    again = run_once("demo", out, {"k": 1}, [source], ["result.txt"], compute)
    assert (first["skipped"], again["skipped"], len(calls)) == (False, True, 1)
    run_once("demo", out, {"k": 2}, [source], ["result.txt"], compute)  # params changed
    source.write_text("b")
    run_once("demo", out, {"k": 2}, [source], ["result.txt"], compute)  # input bytes changed
    (out / "result.txt").unlink()
    run_once("demo", out, {"k": 2}, [source], ["result.txt"], compute)  # output gone
    assert len(calls) == 4 and (out / "result.txt").read_text() == "bb"
    assert json.loads((out / RECORD_FILE).read_text())["summary"] == {"n": 4}


def test_run_once_leaves_no_record_when_the_step_fails(tmp_path: Path) -> None:
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_once("demo", tmp_path / "out", {}, [], ["x"], broken)
    assert not (tmp_path / "out" / RECORD_FILE).exists()
    with pytest.raises(RuntimeError, match="without writing x"):
        run_once("demo", tmp_path / "out", {}, [], ["x"], lambda: {})


@pytest.mark.slow
def test_saft_run_end_to_end_then_skips_every_step(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    args = ["run", "--params", str(REPO / "params.yaml"), "--out", str(out), "--no-tracking"]
    for item in SMALL:
        args += ["--set", item]
    code = main(args)
    text = capsys.readouterr().out
    assert code in (0, 3)  # 3: validity checks failed (possible at this tiny size), still reported
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {a["model"] for a in results["aggregates"]} == set(DEFAULT_METHODS)
    assert set(results["checks"]) and isinstance(results["checks_passed"], bool)
    assert results["sizes"]["saft"]["trainable"] == results["sizes"]["random"]["trainable"]
    assert results["sizes"]["wiseft"] == results["sizes"]["full"]  # full's delta at its chosen alpha
    assert 0 < results["sizes"]["lora"]["trainable"] < results["sizes"]["full"]["trainable"]
    assert set(results["wiseft_alpha"]) == {"1"} and (out / "seed1" / "full" / "wiseft" / "wiseft.json").is_file()
    assert "OOD mean" in text and ("PASSED" in text or "FAILED" in text) and "wiseft alpha" in text
    assert yaml.safe_load((out / "params.resolved.yaml").read_text())["finetune"]["steps"] == 6
    delta = (out / "seed1" / "saft" / "delta.safetensors").read_bytes()
    assert main(args) == code
    again = capsys.readouterr().out
    assert again.count("skipped") >= 7  # score x2, finetune x4 (full, lora, saft, random), wiseft
    assert (out / "seed1" / "saft" / "delta.safetensors").read_bytes() == delta


@pytest.mark.slow
def test_saft_run_chooses_each_methods_rate_on_validation_from_its_grid(tmp_path: Path, capsys, monkeypatch) -> None:
    """LoRA and LP-FT over grids of their own (the rate kept is the best on ID validation), WiSE-FT beside full."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    args = ["run", "--params", str(REPO / "params.yaml"), "--out", str(out), "--no-tracking",
            "--set", "finetune.methods=[zeroshot, full, wiseft, lora, lpft]",
            "--set", "finetune.lr_grid={lora: [0.0003, 0.003], lpft: [0.00001, 0.0001]}",
            "--set", "evaluate.alphas=[0.5, 1.0]", "--set", "finetune.probe_steps=20"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) in (0, 3)
    capsys.readouterr()
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {a["model"] for a in results["aggregates"]} == {"zeroshot", "full", "wiseft", "lora", "lpft"}
    for method, grid in (("lora", [0.0003, 0.003]), ("lpft", [0.00001, 0.0001])):
        selection = json.loads((out / "seed1" / method / "select" / "selection.json").read_text())
        assert [c["lr"] for c in selection["candidates"]] == grid
        best = max(selection["candidates"], key=lambda c: (c["val_top1"], -c["lr"]))
        assert selection["chosen_lr"] == best["lr"] == results["learning_rates"][method]
        chosen = json.loads((out / "seed1" / method / "finetune.json").read_text())
        assert chosen["config"]["lr"] == best["lr"]
    # every method is on the matched-ID line (the alpha curves were measured), WiSE-FT on full's curve
    assert set(results["ood_at_matched_id"]) == {"id", "full", "wiseft", "lora", "lpft"}
    assert results["ood_at_matched_id"]["wiseft"] == results["ood_at_matched_id"]["full"]
    report = (out / "eval" / "report.html").read_text()
    assert "OOD mean at matched ID" in report and "wiseft_alpha.png" in report


def test_task_log_keeps_the_terminal_to_one_line_per_task() -> None:
    import io

    from saft.orchestration.tasklog import TaskLog

    log, terminal = io.StringIO(), io.StringIO()
    sink = TaskLog(log, terminal, {"score": "score-saft"})
    sink.write("    {\"executorInput\": {}}\n    [KFP Executor] lots of output\n")
    cyan, reset = "\x1b[96m", "\x1b[0m"
    for message in [f"Executing task {cyan}'prepare'{reset}", "Executing task 'prepare'",
                    f"Task {cyan}'prepare'{reset} finished with status \x1b[92mSUCCESS\x1b[0m",
                    "Task 'prepare' finished with status SUCCESS", "Executing task 'score'",
                    "Task 'score' finished with status FAILURE", "Pipeline 'p' finished with status SUCCESS"]:
        sink.event(message)
    assert log.getvalue().count("\n") == 2  # what tasks print goes to the log only
    lines = terminal.getvalue().splitlines()
    assert [line.split(" in ")[0] for line in lines] == ["  task  1 prepare: success", "  task  2 prepare: success",
                                                         "  task  3 score-saft: failure"]
    assert all(line.endswith(" s") for line in lines) and sink.failed == ["score"]


def test_task_log_counts_tasks_whose_messages_reach_no_handler(tmp_path: Path, capsys) -> None:
    """kfp.local's parallel tasks swap the root logger's handlers and level under each other."""
    import logging

    from saft.orchestration.tasklog import task_log

    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    root.setLevel(logging.WARNING)
    try:
        with task_log(tmp_path / "kfp.log") as sink:
            root.handlers.clear()  # as another task's context left them
            logging.info("Executing task 'evaluate'")
            logging.info("Task 'evaluate' finished with status SUCCESS")
        assert sink.finished == 1 and root.level == logging.WARNING
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "task  1 evaluate: success" in capsys.readouterr().out


def test_task_log_keeps_kfp_locals_global_swaps_off_the_terminal(tmp_path: Path, capsys) -> None:
    """What leaked into `make demo` after the first loop: a stderr handler that a module-level
    logging.info installs when parallel tasks left the root logger without handlers (raw
    `INFO:root:Task ... outputs:` with colour codes), and an indenting print left behind."""
    import builtins
    import logging

    from saft.orchestration.tasklog import task_log

    root = logging.getLogger()
    handlers, print_ = root.handlers[:], builtins.print
    with task_log(tmp_path / "kfp.log") as sink:
        root.handlers.clear()  # as a parallel task's logger context left them
        logging.info("Task \x1b[96m'prepare'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
        logging.info("Task \x1b[96m'prepare'\x1b[0m outputs:\n    data: Dataset( name='data' )")
        logging.info("Task score cache hit (key=0123456789ab); skipping execution.")
        builtins.print = lambda *a, **k: print_("    ", *a, **k)  # kfp.local's indented_print, not undone
        print("a task's own output")
    assert root.handlers == handlers and builtins.print is print_
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines() == ["  task  1 prepare: success", "  task  2 score: cached"]
    assert sink.cached == 1
    logged = (tmp_path / "kfp.log").read_text()
    assert "outputs:" in logged and "a task's own output" in logged and "\x1b[" not in logged


def test_display_names_of_the_pipeline_tasks() -> None:
    from saft.orchestration.client import build_pipeline
    from saft.orchestration.cluster import ClusterConfig
    from saft.orchestration.tasklog import display_names

    names = display_names(build_pipeline("benchmark", ClusterConfig(kubernetes=False)))
    assert names["train-method"] == "train-method" and names["gather-seed"] == "gather-seed"
    assert not any(k.startswith(("finetune", "score")) for k in names)  # the methods are a loop, scoring inside
    assert names["evaluate"] == "evaluate" and names["register"] == "register"


def test_task_log_shows_the_tail_when_the_pipeline_stops(tmp_path: Path, capsys) -> None:
    import warnings

    from saft.orchestration.tasklog import task_log

    with pytest.raises(RuntimeError, match="task failed"):
        with task_log(tmp_path / "kfp.log"):
            for i in range(100):
                print(f"line {i}")
            warnings.warn("a setting has no effect locally", UserWarning)
            raise RuntimeError("task failed")
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing but task lines reach the terminal
    assert f"last lines of {tmp_path / 'kfp.log'}" in captured.err
    assert "line 99" in captured.err and "line 10\n" not in captured.err
    logged = (tmp_path / "kfp.log").read_text()
    assert logged.startswith("line 0\n") and "UserWarning: a setting has no effect locally" in logged


@pytest.mark.slow
def test_kfp_local_pipeline_end_to_end_with_tracking(tmp_path: Path, monkeypatch, capsys) -> None:
    """The Kubeflow pipeline function under kfp.local, logging to the default local MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["pipeline", "run", "--local", "--params", str(REPO / "params.yaml"), "--out", str(tmp_path / "kfp")]
    for item in SMALL:
        args += ["--set", item]
    code = main(args)
    text = capsys.readouterr().out
    assert code in (0, 3), text[-3000:]
    results = sorted((tmp_path / "kfp" / "kfp").glob("*/collect/results/results.json"))
    assert len(results) == 1
    summary = json.loads(results[0].read_text())
    assert {a["model"] for a in summary["aggregates"]} == set(DEFAULT_METHODS)  # the default method list
    assert summary["sizes"]["wiseft"] == summary["sizes"]["full"] and "1" in summary["wiseft_alpha"]
    per_dataset = summary["aggregates"][0]["per_dataset"]
    assert len(per_dataset) == 1 + len(OOD_DOMAINS)  # one evaluation task per suite dataset, merged
    assert "OOD mean" in text
    # kfp.local's own output went to the log; the terminal got a line per task
    assert "Executing task" in (tmp_path / "kfp" / "kfp.log").read_text() and "Executing task" not in text
    # for one seed: start, data-version, world, protocol, prepare, 4 x train-method, gather-seed,
    # gather-deltas, suite-datasets, an evaluate per suite dataset, collect, register, finish
    assert text.count("  task ") == 15 + 1 + len(OOD_DOMAINS) and len(text.splitlines()) < 80
    assert text.count("train-method: success") == 4
    decision = sorted((tmp_path / "kfp" / "kfp").glob("*/register/decision/register.json"))
    assert decision, "the register task wrote no decision"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    steps = {r.data.tags.get("mlflow.runName", r.info.run_name) for r in children}
    assert {"prepare seed1", "score saft seed1", "finetune saft seed1", "finetune lora seed1", "wiseft seed1",
            "collect"} <= steps

    # what `make demo` leaves in the registry: a champion whatever the candidate's verdict
    register = json.loads(decision[0].read_text())
    assert register["baseline"]["version"] == "1" and register["version"] == "2"
    champion = client.get_model_version_by_alias("saft-tiny", "champion")
    assert str(champion.version) == ("2" if register["verdict"] == "promoted" else "1")
    assert client.get_model_version("saft-tiny", "1").tags["saft.baseline"] == "true"
    assert client.get_model_version("saft-tiny", "2").tags["saft.promotion.verdict"] == register["verdict"]
    assert "zero-shot baseline" in text


@pytest.mark.slow
def test_kfp_local_pipeline_without_tracking_registers_nothing_anywhere(tmp_path: Path, monkeypatch, capsys) -> None:
    """`--no-tracking` whatever the environment points at: no run, no registered model, no register task."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # a registry the environment names: it must stay untouched
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["pipeline", "run", "--local", "--no-tracking", "--params", str(REPO / "params.yaml"), "--out",
            str(tmp_path / "kfp")]
    for item in SMALL:
        args += ["--set", item]
    code = main(args)
    text = capsys.readouterr().out
    assert code in (0, 3), text[-3000:]
    import re

    assert re.search(r"finish-run(-\d)?: success", text) and not re.search(r"task +\d+ register:", text)
    assert "registry: nothing registered (tracking is off: --no-tracking)" in text
    assert not list((tmp_path / "kfp" / "kfp").glob("*/register/decision/register.json"))
    client = mlflow.MlflowClient(tracking_uri=store)
    assert client.search_registered_models() == []
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
