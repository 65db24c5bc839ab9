"""One tracking store for every command (issue 22): what `saft register` wrote, `saft serve` finds.

With ``MLFLOW_TRACKING_URI`` unset, registration writes to ``./mlruns/mlflow.db``; MLflow's
own default (``./mlflow.db``, or a file store in ``./mlruns``) is another store, so a served
``models:/NAME@champion`` used to be "not found". Here a candidate is registered from a
folder and served from the same folder by the `saft serve` command in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from services import free_port, no_proxy_env
from tracking_support import ALPHA, png_b64

CLI = "import sys, saft.cli; sys.exit(saft.cli.main(sys.argv[1:]))"


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SAFT_TRACKING"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _env(folder: Path) -> dict:
    env = no_proxy_env({"SAFT_CACHE_DIR": str(folder / "serve-cache"), "OMP_NUM_THREADS": "1"})
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SAFT_TRACKING", "SAFT_BASE_WEIGHTS"):
        env.pop(key, None)
    return env


def test_serve_finds_what_register_wrote_in_the_default_store(folder, candidate):
    from saft.data.synth import SHAPES, render
    from saft.steps.register import RegisterConfig, register_step
    from saft.world.task import WORLD_SEED

    name = f"saft-tiny-{uuid.uuid4().hex[:6]}"
    result = register_step(RegisterConfig(model_name=name, alpha=ALPHA, baseline=True, ood_tolerance=0.02,
                                          id_tolerance=0.02), candidate.metrics, candidate.delta, folder / "reg",
                           base_model="tiny", data_dir=candidate.data_dir)
    assert result["tracking_uri"] == f"sqlite:///{folder.resolve() / 'mlruns' / 'mlflow.db'}"
    champion = result["aliases"]["champion"]
    assert not (folder / "mlflow.db").exists()

    # a name the store does not have: one line naming the store that was searched and what to do
    missing = subprocess.run([sys.executable, "-c", CLI, "serve", f"models:/{name}-nope@champion"], cwd=folder,
                             env=_env(folder), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert f"registered model '{name}-nope' not found on the MLflow store sqlite:///{folder.resolve()}" \
           f"/mlruns/mlflow.db (the default: MLFLOW_TRACKING_URI is unset" in missing.stderr, missing.stderr
    assert "MLFLOW_TRACKING_URI" in missing.stderr.split("not found")[1]

    port = free_port()
    log = open(folder / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-c", CLI, "serve", f"models:/{name}@champion", "--port", str(port),
                               "--threads", "1"], cwd=folder, env=_env(folder), stdout=log, stderr=subprocess.STDOUT)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (folder / "serve.log").read_text()[-3000:]
            try:
                with opener.open(f"http://127.0.0.1:{port}/v1/models/{name}", timeout=5) as answer:
                    described = json.loads(answer.read())
                if described.get("ready"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (folder / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        assert described["version"] == champion
        image = render("photo", SHAPES[0], 40_000, WORLD_SEED).image
        body = json.dumps({"instances": [{"b64": png_b64(image)}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{name}:predict", data=body,
                                         headers={"Content-Type": "application/json"})
        with opener.open(request, timeout=60) as answer:
            assert answer.status == 200 and json.loads(answer.read())["predictions"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()
    assert not (folder / "mlflow.db").exists() and not (folder / "mlruns" / "0").exists()  # MLflow's default untouched


def test_a_command_hands_its_store_to_child_processes_started_elsewhere(folder, tmp_path):
    from saft.tracking.config import resolve_config, use_store

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "from saft.tracking.config import resolve_config; print(resolve_config().uri)"
    with use_store() as config:
        child = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=dict(os.environ), capture_output=True,
                               text=True, timeout=120, check=True)
    assert child.stdout.strip() == config.uri == f"sqlite:///{folder.resolve() / 'mlruns' / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # restored after the command
    again = resolve_config()
    assert again.uri == config.uri and again.is_default
    # the artifacts of a local store live next to its database, whoever reads it from wherever
    os.environ["MLFLOW_TRACKING_URI"] = config.uri
    try:
        assert resolve_config().artifact_location == (folder.resolve() / "mlruns" / "artifacts").as_uri()
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_a_half_created_default_store_says_how_to_set_it_aside(folder):
    from saft.tracking import TrackingError, start_pipeline_run

    db = folder / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(b"not a database, as an interrupted first run could leave it" * 10)
    with pytest.raises(TrackingError) as err:
        start_pipeline_run("p", {})
    message = str(err.value)
    assert f"mv {db.parent} {db.parent}.broken" in message and str(db) in message


def test_an_error_that_quotes_a_tracking_uri_is_printed_without_its_password(monkeypatch, capsys):
    import saft.cli as cli

    def fail(args):
        raise RuntimeError("no MLflow parent run tagged x on http://alice:s3cr3t-pw@tracking.example:5000")

    monkeypatch.setattr(cli, "_run_command", fail)
    assert cli.main(["world", "--fingerprint"]) == 2
    err = capsys.readouterr().err
    assert "s3cr3t-pw" not in err and "alice:***@tracking.example" in err
