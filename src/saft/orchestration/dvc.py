"""``saft repro``: ``dvc repro`` as one tracked pipeline run.

DVC runs each stage as a command in a child process of ``dvc`` and passes the
environment down, so the parent MLflow run is opened here, its id exported as
``SAFT_PARENT_RUN_ID``, and every ``saft`` step command of the stages logs a nested run
under it. The parent run ends FINISHED or FAILED with dvc's exit status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from saft.steps.tracked import PARENT_ENV


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    found = str(local) if local.exists() else shutil.which("dvc")
    if not found:
        raise RuntimeError("dvc is not installed in this environment; run `make install`")
    return found


def repro(dvc_args: list[str], *, tracking: bool = True, params_file: str = "params.yaml") -> int:
    env = dict(os.environ)
    parent = ""
    if tracking:
        from saft.steps.params import load_params
        from saft.tracking.runs import start_pipeline_run

        params = load_params(params_file if Path(params_file).is_file() else None)
        parent = start_pipeline_run("dvc repro", params.to_dict(), {"saft.runner": "dvc"})
        env[PARENT_ENV] = parent
        print(f"MLflow parent run {parent}; stages log nested runs under it")
    args = dvc_args[1:] if dvc_args[:1] == ["--"] else dvc_args
    code = subprocess.call([_dvc(), "repro", *args], env=env)
    if parent:
        from saft.tracking.runs import end_pipeline_run

        end_pipeline_run(parent, "FINISHED" if code == 0 else "FAILED")
    return code
