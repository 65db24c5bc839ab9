"""Serving the champion with ``mlflow models serve`` and classifying real images over HTTP."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tracking_support import AWS_TEST_ENV, png_b64, stop_service
from services import Service, ServiceError, free_port

SERVING_MODULES = ("uvicorn", "fastapi", "starlette")


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=120) as response:
        return json.loads(response.read())


def test_champion_is_served_and_classifies_images(pipeline, mlflow_server, candidate, tmp_path):
    import importlib.util

    missing = [m for m in SERVING_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"mlflow models serve needs {', '.join(missing)}, not installed in this environment")
    from saft.data.synth import SHAPES, render
    from saft.world.task import WORLD_SEED

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
        shapes = list(SHAPES[:4])
        images = [render("textile", shape, 30_000 + i, WORLD_SEED).image for i, shape in enumerate(shapes)]
        payload = {"dataframe_split": {"columns": ["image"], "data": [[png_b64(im)] for im in images]}}
        predictions = _post(f"http://127.0.0.1:{port}/invocations", payload)["predictions"]
        assert len(predictions) == len(images)
        for row in predictions:
            assert set(row) == {"label", "probability", "probabilities"}
            assert row["label"] in classes
            assert len(row["probabilities"]) == len(classes)
            assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-5)
            assert row["probability"] == pytest.approx(max(row["probabilities"]))
            assert classes[row["probabilities"].index(max(row["probabilities"]))] == row["label"]

        # the served champion answers like the registered model loaded here
        import mlflow.pyfunc
        import pandas as pd

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
            local = mlflow.pyfunc.load_model(f"models:/{pipeline.model_name}@champion")
        expected = local.predict(pd.DataFrame({"image": [png_b64(im) for im in images]}))
        assert [r["label"] for r in predictions] == list(expected["label"])
        for row, probs in zip(predictions, expected["probabilities"]):
            assert row["probabilities"] == pytest.approx(list(probs), abs=1e-5)

        # records orientation and a bad image: a 4xx with the reason, not a crash
        one = _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"image": png_b64(images[0])}]})
        assert one["predictions"][0]["label"] == predictions[0]["label"]
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"image": "not base64!"}]})
        assert err.value.code in (400, 422, 500) and "base64" in err.value.read().decode()
    finally:
        stop_service(service)
