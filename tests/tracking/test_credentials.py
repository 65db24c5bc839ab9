"""Credentials of the tracking server work and are never shown (issue 23).

The session's ``mlflow server`` is put behind a proxy that refuses requests without basic
auth. A secret is planted as the password, in the URI (``http://user:secret@host``) and
in ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``; `saft register` and the
served model's load run against it in their own processes, and then every output is
searched for the secret (and its URL- and base64-encoded forms): their stdout and stderr,
the files they wrote, and in MLflow every param, tag and description of the runs, the
versions, the logged models and the artifacts logged with them.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest
from services import free_port, no_proxy_env
from tracking_support import ALPHA, AWS_TEST_ENV, BasicAuthProxy

USER = "saft-ci"


@pytest.fixture(scope="module")
def secret() -> str:
    return f"Pl4nted/{uuid.uuid4().hex}"  # a '/' so that the URI carries it percent-encoded


@pytest.fixture(scope="module")
def proxy(mlflow_server, secret):
    proxy = BasicAuthProxy(mlflow_server.url, USER, secret)
    yield proxy
    proxy.close()


def _forms(secret: str) -> list[str]:
    return [secret, urllib.parse.quote(secret, safe=""), base64.b64encode(f"{USER}:{secret}".encode()).decode()]


def _program(then: str = "") -> str:
    """Run ``saft`` commands one after the other in one process, each with its own extra environment, then ``then``.

    ``exit=<status>`` is printed to stdout and stderr after each command.
    """
    return ("import json, os, sys, saft.cli\n"
            "for args, env in json.loads(sys.argv[1]):\n"
            "    saved = dict(os.environ); os.environ.update(env)\n"
            "    code = saft.cli.main(args); sys.stdout.flush(); sys.stderr.flush()\n"
            "    print(f'exit={code}', flush=True); print(f'exit={code}', file=sys.stderr, flush=True)\n"
            "    os.environ.clear(); os.environ.update(saved)\n" + then)


def _saft(commands: list[tuple[list[str], dict]], env: dict, cwd: Path, then: str = "",
          args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _program(then), json.dumps(commands), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _env(mlflow_server, tmp_path: Path, **extra) -> dict:
    base = {**AWS_TEST_ENV, "MLFLOW_S3_ENDPOINT_URL": mlflow_server.s3_endpoint, "SAFT_CACHE_DIR": str(tmp_path / "c"),
            "OMP_NUM_THREADS": "1"}
    env = no_proxy_env({**base, **extra})
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "SAFT_TRACKING"):
        if key not in extra:
            env.pop(key, None)
    return env


def _register_args(candidate, out: Path, name: str) -> list[str]:
    return ["register", "--metrics", str(candidate.metrics), "--delta", str(candidate.delta), "--data",
            str(candidate.data_dir), "--model", "tiny", "--model-name", name, "--alpha", str(ALPHA),
            "--ood-tolerance", "0.02", "--id-tolerance", "0.02", "--baseline", "--out", str(out),
            "--experiment", f"{name}-exp"]


def _mlflow_texts(mlflow_server, name: str, tmp_path: Path) -> list[str]:
    """Everything MLflow holds about the runs, versions and logged models of ``name``: params, tags, descriptions, artifacts."""
    client = mlflow_server.client()
    texts = []
    experiment = client.get_experiment_by_name(f"{name}-exp")
    for run in client.search_runs([experiment.experiment_id]):
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags), run.info.artifact_uri]
        folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl" / run.info.run_id)))
        texts += [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()
                  and p.suffix in (".json", ".txt", ".yaml", "") and p.stat().st_size < 5_000_000]
    for model in client.search_logged_models([experiment.experiment_id]):
        texts += [json.dumps(model.tags), json.dumps(model.params), model.artifact_location]
    for mv in client.search_model_versions(f"name = '{name}'"):
        texts += [json.dumps(mv.tags), mv.description or "", mv.source]
    texts.append(json.dumps(client.get_registered_model(name).tags))
    return texts


def test_credentials_in_the_uri_work_and_are_never_shown(proxy, mlflow_server, candidate, secret, tmp_path):
    name = f"saft-auth-{uuid.uuid4().hex[:8]}"
    uri = proxy.url(f"{USER}:{urllib.parse.quote(secret, safe='')}")
    env = _env(mlflow_server, tmp_path)

    # credentials in the URI: registered and promoted through the authenticating proxy
    done = _saft([(_register_args(candidate, tmp_path / "r1", name), {"MLFLOW_TRACKING_URI": uri})], env, tmp_path)
    assert done.returncode == 0 and "exit=0" in done.stdout, done.stderr[-3000:]
    assert "verdict: promoted" in done.stdout
    assert proxy.allowed > 20  # everything went through the proxy, with the credentials
    doc = json.loads((tmp_path / "r1" / "register.json").read_text())
    assert doc["tracking_uri"] == f"http://{USER}:***@127.0.0.1:{proxy.port}"

    # credentials in MLFLOW_TRACKING_USERNAME/PASSWORD with a clean URI: the existing version is found, and the
    # served model loads through the proxy (its base from saft-bases, its files from the logged model)
    by_env = {"MLFLOW_TRACKING_URI": proxy.url(), "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": secret}
    load = ("os.environ.update(json.loads(sys.argv[2])); import mlflow.pyfunc\n"
            "m = mlflow.pyfunc.load_model(sys.argv[3]); print('classes', len(m.unwrap_python_model().classes))\n")
    again = _saft([(_register_args(candidate, tmp_path / "r2", name), by_env)], env, tmp_path, then=load,
                  args=(json.dumps(by_env), f"models:/{name}@champion"))
    assert again.returncode == 0 and "exit=0" in again.stdout, again.stderr[-3000:]
    assert "existing version (same candidate key)" in again.stdout
    assert "classes" in again.stdout

    # failures name the store, never the secret: no credentials, a wrong name, a server that is gone
    gone = f"http://{USER}:{urllib.parse.quote(secret, safe='')}@127.0.0.1:{free_port()}"
    failed = _saft([(_register_args(candidate, tmp_path / "r0", name), {"MLFLOW_TRACKING_URI": proxy.url()}),
                    (["serve", f"models:/{name}-missing@champion"], {"MLFLOW_TRACKING_URI": uri}),
                    (_register_args(candidate, tmp_path / "r3", name), {"MLFLOW_TRACKING_URI": gone})], env, tmp_path)
    errors = failed.stderr.split("exit=")
    assert failed.stdout.count("exit=2") == 3, failed.stderr[-3000:]
    assert "refused the credentials (HTTP 401)" in errors[0] and "MLFLOW_TRACKING_PASSWORD" in errors[0]
    assert f"registered model '{name}-missing' not found" in errors[1]
    assert f"{USER}:***@127.0.0.1:{proxy.port}" in errors[1]
    assert "is not reachable" in errors[2]

    outputs = [p.stdout + p.stderr for p in (done, again, failed)]
    files = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".json"]
    everything = outputs + files + _mlflow_texts(mlflow_server, name, tmp_path)
    for form in _forms(secret):
        leaks = [text[max(0, text.find(form) - 200):text.find(form) + 50] for text in everything if form in text]
        assert not leaks, leaks


def test_redaction_covers_the_forms_a_secret_takes(monkeypatch):
    from saft.tracking.config import TrackingConfig, redact

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s%2Fcret-1@mlflow.example:443/x?token=tok-123&keep=1")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-pass-42")
    text = ("failed https://bob:s%2Fcret-1@mlflow.example:443/x?token=tok-123&keep=1 (decoded s/cret-1, "
            "env env-pass-42, postgresql://u:pg-pw@db/mlflow)")
    out = redact(text)
    for secret in ("s%2Fcret-1", "s/cret-1", "tok-123", "env-pass-42", "pg-pw"):
        assert secret not in out, out
    assert "https://bob:***@mlflow.example:443/x?token=***&keep=1" in out and "postgresql://u:***@db" in out
    config = TrackingConfig("https://bob:s%2Fcret-1@mlflow.example:443", None)
    assert "cret" not in repr(config) and "cret" not in str(config) and "cret" not in config.where
