"""Tracking without a server: names, tracking off, the default local store, failures, the pyfunc model."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tracking_support import ALPHA, png_b64
from services import free_port

from saft.eval.metrics import Record, metrics_document
from saft.tracking import (
    TRACKING_OFF_RUN_ID,
    NullTracker,
    TrackingUnavailable,
    end_pipeline_run,
    start_pipeline_run,
    step_run,
)
from saft.tracking.config import resolve_config
from saft.tracking.naming import flatten_params, metrics_from_document
from saft.tracking.registry import candidate_key


@pytest.fixture
def no_server(monkeypatch, tmp_path):
    """Tracking configured by environment only, from an empty working directory."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SAFT_TRACKING"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_flatten_params():
    flat = flatten_params({"model": "ViT-B-16@openai", "finetune": {"lr": 1e-4, "betas": [0.9, 0.999],
                                                                    "sched": {"warmup": 0}}, "empty": {}, "x": None})
    assert flat == {"model": "ViT-B-16@openai", "finetune.lr": "0.0001", "finetune.betas": "[0.9, 0.999]",
                    "finetune.sched.warmup": "0", "empty": "{}", "x": "None"}
    assert len(flatten_params({"long": "a" * 10_000})["long"]) == 6000


def test_metric_names_from_a_metrics_document():
    records = [Record("zeroshot", "imagenet", "id", 0.6, 10), Record("zeroshot", "imagenet-sketch", "ood", 0.4, 10),
               Record("saft", "imagenet", "id", 0.7, 10, seed=1, alpha=1.0),
               Record("saft", "imagenet-sketch", "ood", 0.42, 10, seed=1, alpha=1.0),
               Record("saft", "imagenet", "id", 0.65, 10, seed=1, alpha=0.5),
               Record("saft", "imagenet-sketch", "ood", 0.43, 10, seed=1, alpha=0.5)]
    metrics = metrics_from_document(metrics_document(records, {"suite": "s"}))
    assert metrics["saft.id"] == 0.7 and metrics["saft.ood_mean"] == 0.42
    assert metrics["saft.imagenet-sketch"] == 0.42
    assert metrics["saft.alpha_0.5.id"] == 0.65
    assert metrics["zeroshot.ood_mean"] == 0.4
    assert metrics["saft.ood_gain"] == pytest.approx(0.02)
    assert "zeroshot.ood_gain" in metrics and "saft.id_std" not in metrics  # one seed: no spread to log


def test_candidate_key_covers_delta_document_method_and_alpha(tmp_path):
    delta = tmp_path / "d.safetensors"
    delta.write_bytes(b"delta-bytes")
    doc = {"schema": "saft-metrics/1", "records": [1], "meta": {"suite": "s"}}
    key = candidate_key(delta, doc, method="saft", alpha=1.0)
    assert key == candidate_key(delta, json.loads(json.dumps(doc)), method="saft", alpha=1)
    assert key != candidate_key(delta, {**doc, "records": [2]}, method="saft", alpha=1.0)
    assert key != candidate_key(delta, doc, method="saft", alpha=0.5)
    assert key != candidate_key(delta, doc, method="random", alpha=1.0)
    delta.write_bytes(b"other-bytes")
    assert key != candidate_key(delta, doc, method="saft", alpha=1.0)


def test_tracking_off_makes_every_tracker_a_no_op_with_sane_values(no_server, monkeypatch, candidate):
    from saft.steps.register import RegisterConfig, register_step

    monkeypatch.setenv("SAFT_TRACKING", "off")
    parent = start_pipeline_run("p", {"a": {"b": 1}})
    assert parent == TRACKING_OFF_RUN_ID
    with step_run("finetune", parent, {"lr": 1}) as tracker:
        assert isinstance(tracker, NullTracker) and not tracker.enabled and tracker.run_id is None
        assert tracker.log_params({"a": {"b": 1}}) == {"a.b": "1"}
        assert tracker.log_metrics({"loss": 1.5, "note": "text"}) == {"loss": 1.5}
        assert tracker.log_history([{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 1.0, "lr": 0.1}]) == 4
        assert tracker.log_metrics_document(candidate.doc())["saft.textile"] >= 0
        assert "report.html" in tracker.log_report(candidate.eval_dir)
    end_pipeline_run(parent)
    result = register_step(RegisterConfig(alpha=ALPHA), candidate.metrics, candidate.delta, no_server / "out",
                           base_model="tiny", data_dir=candidate.data_dir, parent_run_id=parent)
    assert result["verdict"] == "skipped" and result["version"] is None
    assert "tracking is off" in result["reason"] and "against zero-shot the gate would have" in result["reason"]
    assert len(result["checks"]) == 2
    assert json.loads((no_server / "out" / "register.json").read_text()) == result
    assert not (no_server / "mlruns").exists()


def test_unreachable_server_fails_fast_with_the_uri_and_the_remedy(no_server, monkeypatch, candidate):
    from saft.steps.register import RegisterConfig, register_step

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        start_pipeline_run("p", {})
    assert time.monotonic() - started < 10
    assert isinstance(err.value, RuntimeError)
    assert uri in str(err.value) and "SAFT_TRACKING=off" in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)

    ran = []
    with pytest.raises(TrackingUnavailable, match="not reachable"):
        with step_run("score", None):
            ran.append(True)
    assert not ran  # the step's work never starts when its metrics could not be logged

    started = time.monotonic()
    with pytest.raises(RuntimeError, match=uri.replace(".", r"\.")):
        register_step(RegisterConfig(alpha=ALPHA), candidate.metrics, candidate.delta, no_server / "out",
                      base_model="tiny", data_dir=candidate.data_dir)
    assert time.monotonic() - started < 30
    assert not (no_server / "out" / "register.json").exists()


def test_default_store_is_sqlite_in_the_working_directory(no_server, candidate):
    from mlflow import MlflowClient

    config = resolve_config()
    assert config.uri == f"sqlite:///{no_server.resolve() / 'mlruns' / 'mlflow.db'}"
    parent = start_pipeline_run("local", {"k": 1}, experiment="local-test")
    with step_run("evaluate", parent) as tracker:
        tracker.log_report(candidate.eval_dir)
    end_pipeline_run(parent)
    assert (no_server / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(config.uri)
    exp = client.get_experiment_by_name("local-test")
    assert exp.artifact_location == (no_server.resolve() / "mlruns" / "artifacts").as_uri()
    assert client.get_run(parent).info.status == "FINISHED"
    reports = list((no_server / "mlruns" / "artifacts").rglob("report/report.html"))
    assert len(reports) == 1 and reports[0].read_bytes() == (candidate.eval_dir / "report.html").read_bytes()


def test_end_pipeline_run_checks_the_status():
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        end_pipeline_run("abc", status="DONE")


def test_mlflow_is_imported_only_by_tracking_functions():
    code = ("import sys, saft, saft.sparse, saft.models, saft.tracking, saft.cli.register, saft.steps.register, "
            "saft.tracking.registry, saft.tracking.promotion; print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
    src = Path(__file__).resolve().parents[2] / "src" / "saft"
    for layer in ("sparse", "models"):
        for path in (src / layer).rglob("*.py"):
            assert "mlflow" not in path.read_text(), path


# --- the pyfunc model, loaded in this process -------------------------------------------------


def test_pyfunc_model_classifies_like_the_evaluated_model(candidate, tmp_path):
    import mlflow.pyfunc
    import pandas as pd
    import torch

    from saft.data.synth import SHAPES, render
    from saft.eval.head import build_head
    from saft.models import load_model
    from saft.sparse import apply_delta, load_delta
    from saft.steps.prepared import PreparedData
    from saft.tracking.pyfunc import model_reference, save_pyfunc_model
    from saft.world.task import WORLD_SEED

    data = PreparedData.open(candidate.data_dir)
    loaded = load_model("tiny")
    ref = model_reference(base_model="tiny", base_fingerprint=loaded.fingerprint, classes=data.classes,
                          templates=data.templates, alpha=ALPHA)
    path = save_pyfunc_model(tmp_path / "model", candidate.delta, ref)
    model = mlflow.pyfunc.load_model(str(path))
    images = [render("textile", shape, 20_000 + i, WORLD_SEED).image for i, shape in enumerate(SHAPES)]
    k = len(data.classes)
    out = model.predict(pd.DataFrame({"image": [png_b64(im) for im in images]}), params={"top_k": k})
    assert list(out.columns) == ["label", "probability", "labels", "probabilities"]
    assert len(out) == len(SHAPES)
    for _, row in out.iterrows():
        assert row["label"] == row["labels"][0] and sorted(row["labels"]) == sorted(data.classes)
        assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert row["probability"] == pytest.approx(max(row["probabilities"]))
    assert len(model.predict(pd.DataFrame({"image": [png_b64(images[0])]}))["labels"][0]) == min(5, k)  # default k

    # the same numbers as base + alpha * delta with a head built here
    apply_delta(loaded.model, load_delta(candidate.delta), ALPHA)
    head = build_head(loaded.model, loaded.tokenizer, data.classes, data.templates)
    with torch.inference_mode():
        feats = loaded.model.encode_image(torch.stack([loaded.preprocess(im.convert("RGB")) for im in images]))
        probs = (loaded.model.logit_scale.exp() * torch.nn.functional.normalize(feats, dim=-1) @ head.t()).softmax(-1)
    assert [data.classes[i] for i in probs.argmax(-1).tolist()] == list(out["label"])
    by_class = [[dict(zip(row["labels"], row["probabilities"]))[c] for c in data.classes] for _, row in out.iterrows()]
    assert torch.allclose(torch.tensor(by_class), probs, atol=1e-5)

    with pytest.raises(Exception, match="not valid base64"):
        model.predict(pd.DataFrame({"image": ["not base64!"]}))
    with pytest.raises(Exception, match="not a readable image"):
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"plain text").decode()]}))


def test_pyfunc_model_refuses_another_base(candidate, tmp_path):
    import mlflow.pyfunc

    from saft.steps.prepared import PreparedData
    from saft.tracking.pyfunc import model_reference, save_pyfunc_model

    data = PreparedData.open(candidate.data_dir)
    ref = model_reference(base_model="saft-tiny-clip@random", base_fingerprint="0" * 64, classes=data.classes,
                          templates=data.templates)
    path = save_pyfunc_model(tmp_path / "model", candidate.delta, ref)
    with pytest.raises(Exception, match="delta was trained on 000000000000"):
        mlflow.pyfunc.load_model(str(path))
