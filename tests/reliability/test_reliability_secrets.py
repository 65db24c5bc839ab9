"""No credential from the environment ends up in an output, a log, MLflow or the compiled pipeline.

Pipeline pods get S3, MLflow and KFP credentials as environment variables; anything
that dumps the environment (or a client's configuration) into params, tags, records,
reports or logs would publish them to everyone who can read the bucket or the tracking
server. Each secret here is a unique marker string, searched for in every file written
and in the captured stdout/stderr of each command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAFT = [sys.executable, "-m", "saft.cli"]
SMALL = ["seeds=[1]", "finetune.steps=6", "finetune.warmup_steps=1", "world.pool_per_class=26",
         "world.test_per_class=8", "score.batch_size=16", "finetune.batch_size=16"]
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "KFP_TOKEN", "AWS_SESSION_TOKEN")


@pytest.fixture
def secrets() -> dict[str, str]:
    return {name: f"leak{name.lower().replace('_', '')}{uuid.uuid4().hex}" for name in SECRET_VARS}


def _env(secrets: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SAFT_TRACKING", "SAFT_PARENT_RUN_ID")}
    # A local MLflow store ignores the password; the access key id is a plausible partner of the secret.
    return {**env, **secrets, "AWS_ACCESS_KEY_ID": "AKIDLOCALTEST", "MLFLOW_TRACKING_USERNAME": "saft",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _leaks(blob: bytes, secrets: dict[str, str]) -> list[str]:
    return [name for name, s in secrets.items() if s.encode() in blob]


def _saft(args: list[str], cwd: Path, env: dict, secrets: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(SAFT + args, cwd=cwd, env=env, capture_output=True, timeout=900)
    assert proc.returncode in (0, 3), f"saft {' '.join(args)}:\n{proc.stdout.decode()[-2000:]}\n" \
                                      f"{proc.stderr.decode()[-3000:]}"  # 3: the world's checks failed
    for stream, blob in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        assert not _leaks(blob, secrets), f"saft {args[0]} printed {_leaks(blob, secrets)} on {stream}"
    return proc


def _scan_files(root: Path, secrets: dict[str, str]) -> int:
    files = [p for p in root.rglob("*") if p.is_file()]
    leaked = {str(p.relative_to(root)): _leaks(p.read_bytes(), secrets) for p in files}
    assert not {k: v for k, v in leaked.items() if v}, f"credentials found in {leaked}"
    return len(files)


@pytest.mark.slow
def test_no_credentials_in_outputs_logs_mlflow_or_compiled_pipeline(tmp_path: Path, secrets) -> None:
    args = ["run", "--params", str(REPO / "params.yaml"), "--out", "run"]
    for item in SMALL:
        args += ["--set", item]

    # 1. Untracked run: files on disk and the console.
    _saft(args + ["--no-tracking"], tmp_path, _env(secrets), secrets)
    out = tmp_path / "run"
    assert (out / "params.resolved.yaml").is_file() and list(out.rglob("step.json"))
    assert (out / "eval" / "metrics.json").is_file() and (out / "eval" / "report.html").is_file()

    # 2. Tracked run, default local store (./mlruns): the same folder, so every step is
    # skipped but the parent and step runs still log their params, tags, curves and artifacts.
    _saft(args + ["--set", "register.enabled=false"], tmp_path, _env(secrets), secrets)
    store = tmp_path / "mlruns"
    assert store.is_dir()

    # 3. The compiled pipeline (secrets are referenced by Kubernetes secret name only).
    _saft(["pipeline", "compile", "--image", "registry.example/saft:1", "--out", "compiled/pipeline.yaml"], tmp_path,
          _env(secrets), secrets)
    assert (tmp_path / "compiled" / "pipeline.yaml").is_file()

    # Every file written: outputs, records, reports, the MLflow database and artifacts, the YAML.
    assert _scan_files(tmp_path, secrets) > 20

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 5, "expected a parent run and nested step runs"
    for run in runs:
        stored = "\n".join(f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()).encode()
        assert not _leaks(stored, secrets), f"run {run.info.run_name}: {_leaks(stored, secrets)} in params/tags"
    assert any(run.data.params for run in runs)  # the scan above looked at something
