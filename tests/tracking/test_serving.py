"""Serving the champion from a real registry (MLflow server, artifacts on moto S3).

* the registry holds each base once by fingerprint and every version references it;
* the champion loads from the registry alone (base downloaded through the server from S3,
  head from the artifact, no text tower) and answers batched requests;
* ``mlflow models serve`` still serves the same model.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tracking_support import ALPHA, AWS_TEST_ENV, png_b64, stop_service
from services import Service, ServiceError, free_port

SERVING_MODULES = ("uvicorn", "fastapi", "starlette")


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=120) as response:
        return json.loads(response.read())


def _images(n: int = 4):
    from saft.data.synth import SHAPES, render
    from saft.world.task import WORLD_SEED

    return [render("textile", shape, 30_000 + i, WORLD_SEED).image for i, shape in enumerate(SHAPES[:n])]


def _base_versions(client, fingerprint: str) -> list:
    from saft.tracking.promotion import FINGERPRINT_TAG
    from saft.tracking.registry import BASES_MODEL

    return [mv for mv in client.search_model_versions(f"name = '{BASES_MODEL}'")
            if mv.tags.get(FINGERPRINT_TAG) == fingerprint]


def test_the_registry_stores_each_base_once(pipeline, candidate, mlflow_server, tracking_env, model_name,
                                            tmp_path) -> None:
    from saft.steps.register import RegisterConfig, register_step
    from saft.tracking.promotion import CHAMPION, FINGERPRINT_TAG
    from saft.tracking.registry import BASE_URI_TAG

    client = mlflow_server.client()
    champion = client.get_model_version_by_alias(pipeline.model_name, CHAMPION)
    fingerprint = champion.tags[FINGERPRINT_TAG]
    [base] = _base_versions(client, fingerprint)
    assert champion.tags[BASE_URI_TAG] == f"models:/saft-bases/{base.version}"
    assert base.tags["saft.base_model"] == "tiny" and int(base.tags["saft.base_bytes"]) > 1_000_000
    keys = mlflow_server.s3_keys()
    assert any(k.endswith("/base/weights.safetensors") for k in keys)  # through the server, onto S3
    model_id = champion.source.removeprefix("models:/")
    model_keys = [k for k in keys if model_id in k]  # the logged model's own folder
    assert any(k.endswith("/artifacts/head.safetensors") for k in model_keys)
    assert not any(k.endswith("weights.safetensors") for k in model_keys)  # no base inside a model

    # two more versions of the same base under another name (zero-shot baseline + candidate): no new base
    cfg = RegisterConfig(model_name=model_name, alpha=ALPHA, baseline=True, ood_tolerance=0.02, id_tolerance=0.02)
    result = register_step(cfg, candidate.metrics, candidate.delta, tmp_path / "register", base_model="tiny",
                           data_dir=candidate.data_dir)
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 2 and result["baseline"]["version"]
    assert {mv.tags[BASE_URI_TAG] for mv in versions} == {champion.tags[BASE_URI_TAG]}
    assert len(_base_versions(client, fingerprint)) == 1


def test_the_champion_is_served_from_the_registry_alone(pipeline, candidate, mlflow_server, tracking_env,
                                                        monkeypatch, tmp_path) -> None:
    import saft.eval.head as head_module
    from saft.serving.server import ServeConfig, ServedModel
    from saft.tracking.promotion import CHAMPION, FINGERPRINT_TAG

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower was run at start-up")

    monkeypatch.setattr(head_module, "build_head", refuse)
    monkeypatch.setattr(head_module, "cached_head", refuse)
    champion = mlflow_server.client().get_model_version_by_alias(pipeline.model_name, CHAMPION)
    served = ServedModel(ServeConfig(f"models:/{pipeline.model_name}@{CHAMPION}", device="cpu"))
    served.load()
    try:
        assert served.version == str(champion.version) and served.name == pipeline.model_name
        cached = Path(os.environ["SAFT_CACHE_DIR"]) / "bases" / champion.tags[FINGERPRINT_TAG] / "weights.safetensors"
        assert cached.is_file()  # fetched from the registry's copy, not rebuilt from the spec
        body = json.dumps({"instances": [{"b64": png_b64(im)} for im in _images()], "parameters": {"top_k": 2}})
        answer = asyncio.run(served.predict(body.encode()))
    finally:
        served.close()
    assert answer["model_version"] == str(champion.version)
    assert [len(p["labels"]) for p in answer["predictions"]] == [2, 2, 2, 2]
    assert all(p["labels"][0] in candidate.classes() for p in answer["predictions"])


def test_mlflow_models_serve_serves_the_champion(pipeline, mlflow_server, candidate, tmp_path) -> None:
    import importlib.util

    missing = [m for m in SERVING_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"mlflow models serve needs {', '.join(missing)}, not installed in this environment")
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    env = {**AWS_TEST_ENV, "MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_S3_ENDPOINT_URL": mlflow_server.s3_endpoint,
           "SAFT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           # the scoring server is started as `uvicorn ...` from PATH: the venv's bin must be on it
           "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(exe), "models", "serve", "-m", f"models:/{pipeline.model_name}@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    try:
        service = Service("mlflow models serve", command, f"http://127.0.0.1:{port}/ping", env=env,
                          log_path=tmp_path / "serve.log", timeout=240)
    except ServiceError as exc:
        pytest.fail(str(exc))
    try:
        classes = candidate.classes()
        images = _images()
        payload = {"dataframe_split": {"columns": ["image"], "data": [[png_b64(im)] for im in images]},
                   "params": {"top_k": 3}}
        predictions = _post(f"http://127.0.0.1:{port}/invocations", payload)["predictions"]
        assert len(predictions) == len(images)
        for row in predictions:
            assert set(row) == {"label", "probability", "labels", "probabilities"}
            assert row["label"] == row["labels"][0] in classes and len(row["labels"]) == 3
            assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
            assert row["probability"] == pytest.approx(row["probabilities"][0])

        # the served champion answers like the registered model loaded here
        import mlflow.pyfunc
        import pandas as pd

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
            mp.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
            local = mlflow.pyfunc.load_model(f"models:/{pipeline.model_name}@champion")
        expected = local.predict(pd.DataFrame({"image": [png_b64(im) for im in images]}), params={"top_k": 3})
        assert [r["label"] for r in predictions] == list(expected["label"])
        for row, probs in zip(predictions, expected["probabilities"]):
            assert row["probabilities"] == pytest.approx(list(probs), abs=1e-5)

        # a bad image and an unknown column: a 400 with the reason, not a 500 stack trace
        for bad, needle in (({"image": "not base64!"}, "base64"), ({"picture": png_b64(images[0])}, "picture")):
            with pytest.raises(urllib.error.HTTPError) as err:
                _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [bad]})
            assert err.value.code == 400
            assert needle in err.value.read().decode()
    finally:
        stop_service(service)
