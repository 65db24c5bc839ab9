"""The logged model's environment names what can be installed: the project's wheel and exact pins.

What runs here, offline: the wheel installs from the model folder and is the package
(``saft --version`` from it, its package data included), and the whole requirement set
resolves with ``pip install --dry-run --no-index`` against this environment plus the
model's own ``wheels/`` folder: every pin is satisfiable and nothing needs an index.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from saft.serving.wheel import build_project_wheel, pinned_closure


def _pip(*args, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_is_deterministic_and_holds_the_package(tmp_path) -> None:
    first, second = build_project_wheel(tmp_path / "a"), build_project_wheel(tmp_path / "b")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    names = zipfile.ZipFile(first).namelist()
    assert "saft/serving/server.py" in names and "saft/models/tiny/saft-tiny-clip.safetensors" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    meta = zipfile.ZipFile(first).read("saft-0.1.0.dist-info/METADATA").decode()
    assert "Requires-Dist: torch" in meta
    pins = pinned_closure()
    assert any(p.startswith("torch==") and "+" not in p for p in pins)  # public version, no local label
    assert not any(p.startswith("saft==") for p in pins) and any(p.startswith("mlflow==") for p in pins)


@pytest.mark.slow
def test_the_model_environment_installs_offline(served_folder, tmp_path) -> None:
    model = served_folder / "model"
    requirements = (model / "requirements.txt").read_text().split("\n")
    assert not any(line.startswith("saft==") for line in requirements)  # no index serves that
    wheel = [line for line in requirements if line.startswith("wheels/")]
    assert len(wheel) == 1 and (model / wheel[0]).is_file() and "-c constraints.txt" in requirements

    site = tmp_path / "site"
    done = _pip("install", "--quiet", "--no-index", "--no-deps", "--target", str(site), str(model / wheel[0]))
    assert done.returncode == 0, done.stderr
    assert (site / "bin" / "saft").is_file()  # the console script comes with it
    script = ("import sys, saft.cli, saft.models.tiny as t; print(saft.cli.__file__, t.CHECKPOINT.is_file()); "
              "sys.argv = ['saft', '--version']; saft.cli.main()")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(site / "saft" / "cli" / "__init__.py"), "True", "saft", "0.1.0"]

    report = tmp_path / "report.json"
    resolved = _pip("install", "--dry-run", "--no-index", "--find-links", "wheels", "-r", "requirements.txt",
                    "--report", str(report), cwd=model)
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    to_install = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    assert to_install == [("saft", "0.1.0")]  # every other pin is what this environment has
