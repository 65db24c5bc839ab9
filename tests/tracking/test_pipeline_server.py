"""`saft run` of the embedded pipeline against a real MLflow server (artifacts on local S3).

Asserts on what the server holds afterwards: the parent run, a nested run per step with
its metrics and artifacts, the zero-shot baseline as the first `champion`, the registered
delta version judged against it; then a second candidate with a worse OOD mean is
registered but not promoted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saft.cli import main

REPO = Path(__file__).resolve().parents[2]
SMALL = ["seeds=[1]", "finetune.steps=6", "finetune.warmup_steps=1", "world.pool_per_class=26",
         "world.test_per_class=8", "score.batch_size=16", "finetune.batch_size=16"]


@pytest.mark.slow
def test_saft_run_logs_every_step_and_registers_a_champion(tracking_env, model_name, tmp_path, capsys,
                                                           monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    args = ["run", "--params", str(REPO / "params.yaml"), "--out", str(out),
            "--set", f"register.model_name={model_name}"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) in (0, 3), capsys.readouterr().err[-3000:]
    decision = json.loads((out / "register" / "register.json").read_text())
    assert decision["verdict"] in ("promoted", "rejected")

    client = mlflow.MlflowClient(tracking_uri=tracking_env.url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`saft.out_dir` = '{out.resolve()}'")
    assert len(runs) == 1
    parent = runs[0]
    assert parent.info.status == "FINISHED" and parent.data.params["finetune.steps"] == "6"
    children = client.search_runs(experiments, filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = {r.info.run_name for r in children}
    assert {"world", "prepare seed1", "score saft seed1", "score random seed1", "finetune saft seed1",
            "finetune full seed1", "finetune random seed1", "evaluate"} <= names
    by_name = {r.info.run_name: r for r in children}
    assert any(k.startswith("loss") or "loss" in k for k in by_name["finetune saft seed1"].data.metrics)
    assert "saft.ood_mean" in by_name["evaluate"].data.metrics
    artifacts = [a.path for a in client.list_artifacts(by_name["finetune saft seed1"].info.run_id)]
    assert artifacts, "the delta was not logged"

    # params.yaml's register.baseline: the zero-shot base is v1 and the first champion; the candidate is v2
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{model_name}'")}
    assert sorted(versions) == ["1", "2"]
    assert versions["1"].tags["saft.baseline"] == "true" and versions["1"].tags["saft.promotion.verdict"] == "promoted"
    assert decision["baseline"]["version"] == "1" and decision["version"] == "2"
    champion = client.get_model_version_by_alias(model_name, "champion").version
    assert str(champion) == ("2" if decision["verdict"] == "promoted" else "1")
    assert versions["2"].tags["saft.promotion.compared_to"] == "1"

    # A second candidate whose OOD mean is far worse: registered, not promoted, reason in its tags.
    worse = json.loads((out / "eval" / "metrics.json").read_text())
    for record in worse["records"]:
        if record["model"] == "saft" and record["role"] == "ood":
            record["top1"] = 0.0
    from saft.eval.metrics import metrics_document, records_from_document

    worse_doc = metrics_document(records_from_document(worse), worse["meta"])
    (tmp_path / "worse.json").write_text(json.dumps(worse_doc))
    code = main(["register", "--metrics", str(tmp_path / "worse.json"), "--delta",
                 str(out / "seed1" / "saft" / "delta.safetensors"), "--data", str(out / "seed1" / "data"),
                 "--model", "tiny", "--out", str(tmp_path / "register2"), "--model-name", model_name])
    assert code == 0
    second = json.loads((tmp_path / "register2" / "register.json").read_text())
    assert second["verdict"] == "rejected"
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 3
    newest = max(versions, key=lambda v: int(v.version))
    assert newest.tags["saft.promotion.verdict"] == "rejected" and "OOD" in newest.tags["saft.promotion.reason"]
