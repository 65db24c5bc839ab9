"""Step commands under an outside pipeline runner (``saft repro`` around ``dvc repro``)."""

from __future__ import annotations

from pathlib import Path

from saft.cli import main


def test_step_command_logs_a_nested_run_under_the_exported_parent(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    from saft.tracking.runs import end_pipeline_run, start_pipeline_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SAFT_TRACKING", raising=False)
    parent = start_pipeline_run("dvc repro", {"seeds": [1]})
    monkeypatch.setenv("SAFT_PARENT_RUN_ID", parent)
    out = tmp_path / "world"
    assert main(["world", "--out", str(out), "--pool-per-class", "2", "--test-per-class", "1"]) == 0
    assert main(["data", "prepare", "--val-shots", "0", str(out / "photo" / "pool"), "--shots", "1", "--out", str(tmp_path / "d")]) == 0
    end_pipeline_run(parent)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    children = client.search_runs(experiments, filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"world", "data prepare"}
    assert by_name["data prepare"].data.params["shots"] == "1"
    assert "prepare.json" in [a.path for a in client.list_artifacts(by_name["data prepare"].info.run_id)]
    assert all(r.info.status == "FINISHED" for r in children)


def test_without_a_parent_step_commands_log_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAFT_PARENT_RUN_ID", raising=False)
    assert main(["world", "--out", str(tmp_path / "w"), "--pool-per-class", "1", "--test-per-class", "1"]) == 0
    assert not (tmp_path / "mlruns").exists()


def test_saft_repro_nests_every_dvc_stage_under_one_parent(tmp_path: Path, monkeypatch) -> None:
    """A real `dvc repro` (fresh git + dvc repo) of two saft stages, wrapped by `saft repro`."""
    import subprocess
    import sys

    import mlflow
    import yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SAFT_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], check=True)
    stages = {"world": {"cmd": "saft world --out w --pool-per-class 2 --test-per-class 1", "outs": ["w"]},
              "prepare": {"cmd": "saft data prepare w/photo/pool --shots 1 --val-shots 0 --out d", "deps": ["w"], "outs": ["d"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    assert main(["repro", "--params", "missing.yaml"]) == 0

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string="tags.`saft.runner` = 'dvc'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(experiments,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert {r.info.run_name for r in children} == {"world", "data prepare"}
