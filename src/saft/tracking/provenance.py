"""Tags that say which code and data produced a run: git commit, DVC lock, saft version.

Containers (Kubeflow components) usually have no ``.git``; CI can pass the commit in
``SAFT_GIT_COMMIT``. The DVC "revision" is the sha256 of ``dvc.lock``, which pins every
stage's data and outputs, plus the experiment name when ``dvc exp run`` set one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

GIT_COMMIT_TAG = "mlflow.source.git.commit"  # the tag MLflow's UI shows as the source version


def _git(args: list[str], cwd: Path) -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance_tags(cwd: str | Path | None = None) -> dict[str, str]:
    from saft.version import __version__

    cwd = Path(cwd or Path.cwd())
    tags = {"saft.version": __version__}
    commit = os.environ.get("SAFT_GIT_COMMIT") or _git(["rev-parse", "HEAD"], cwd)
    top = _git(["rev-parse", "--show-toplevel"], cwd)
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        if "SAFT_GIT_COMMIT" not in os.environ:
            status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
            if status is not None:
                tags["saft.git.dirty"] = "true" if status else "false"
    for folder in dict.fromkeys([cwd, Path(top) if top else cwd]):
        lock = folder / "dvc.lock"
        if lock.is_file():
            tags["saft.dvc.lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
            break
    if os.environ.get("DVC_EXP_NAME"):
        tags["saft.dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags
