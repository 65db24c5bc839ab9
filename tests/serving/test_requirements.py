"""What environments install: declared dependencies, and a served model's lean environment.

* Every third-party package the code imports (lazy imports included) is declared in
  pyproject.toml (the library or an extra) and pinned in requirements.txt.
* A logged model carries the project's serving wheel (no embedded checkpoint, only the
  library's and the ``serve`` extra's requirements) and the exact pins of that closure,
  with no kfp, dvc, kubernetes or the like.
* Offline: the wheel installs from the model folder and is the package; the requirement
  set resolves with ``pip install --dry-run --no-index`` against this environment; and the
  model loads and predicts, and ``saft serve --help`` runs, in a process that sees the
  standard library, the wheel and the serving closure only (``python -S`` over a folder
  of links to those distributions' installed files).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from saft.serving.wheel import SERVING_EXCLUDES, build_project_wheel, build_serving_wheel, serving_closure

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("kfp", "dvc", "kubernetes", "celery", "pygit2", "google-cloud-storage", "matplotlib", "sqlalchemy", "alembic",
         "scikit-learn", "flask", "gunicorn", "pyarrow")


def _pip(*args, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the files importing it (module level or inside functions)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "saft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top != "saft" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared_and_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        declared |= {_name(r) for r in reqs if not r.startswith("saft[")}
    pinned = {_name(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith(("#", "-"))}
    owners = metadata.packages_distributions()
    imports = _imports()
    assert {"torch", "mlflow", "starlette", "kubernetes", "pandas"} <= set(imports)  # the walk sees lazy imports
    undeclared, unpinned = {}, {}
    for module, files in sorted(imports.items()):
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [])}
        assert dists, f"{module} (imported by {sorted(files)}) is not installed here"
        if not dists & declared:
            undeclared[module] = (sorted(dists), sorted(files)[:3])
        if not dists & pinned:
            unpinned[module] = sorted(dists)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert not unpinned, f"imported but not pinned in requirements.txt: {unpinned}"


def test_the_serving_wheel_is_deterministic_and_lean(tmp_path) -> None:
    first, second = build_serving_wheel(tmp_path / "a"), build_serving_wheel(tmp_path / "b")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    names = zipfile.ZipFile(first).namelist()
    assert "saft/serving/server.py" in names and "saft/models/tiny/saft-tiny-clip.json" in names
    assert not any(n.endswith(SERVING_EXCLUDES) for n in names)  # the 4 MB embedded checkpoint stays out
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert first.stat().st_size < 1_000_000, first.stat().st_size
    full = build_project_wheel(tmp_path / "full")
    assert "saft/models/tiny/saft-tiny-clip.safetensors" in zipfile.ZipFile(full).namelist()

    meta = zipfile.ZipFile(first).read("saft-0.1.0.dist-info/METADATA").decode()
    requires = {_name(line.split(":", 1)[1]) for line in meta.splitlines() if line.startswith("Requires-Dist:")}
    assert {"torch", "open-clip-torch", "safetensors", "mlflow-skinny", "starlette", "uvicorn", "pillow"} <= requires
    assert not requires & {"kfp", "dvc", "mlflow", "matplotlib", "kubernetes"}, requires
    assert "extra ==" not in meta and "Provides-Extra" not in meta

    pins = serving_closure()
    assert any(p.startswith("torch==") and "+" not in p for p in pins)  # public version, no local label
    assert not any(p.startswith("saft==") for p in pins) and any(p.startswith("mlflow-skinny==") for p in pins)
    heavy = [p for p in pins if p.split("==")[0] in HEAVY or p.startswith("mlflow==")]
    assert not heavy, heavy


def _closure_view(pins: list[str], view: Path) -> Path:
    """A folder exposing only the installed files of the pinned distributions (symlinks into site-packages).

    Run with ``python -S`` and ``PYTHONPATH=<wheel>:<view>``, a process sees the standard
    library, the model's wheel and the serving closure, nothing else that is installed
    here. A folder shared with other distributions (``mlflow/`` of mlflow and
    mlflow-skinny, ``nvidia/``) is rebuilt from the closure's own files.
    """
    allowed = {p.split("==")[0] for p in pins}
    owners: dict[str, set[str]] = {}
    files: dict[str, list[Path]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"].lower().replace("_", "-")
        for file in dist.files or []:
            parts = Path(file).parts
            if not parts or parts[0] in ("..", "bin") or parts[0].endswith(".pth"):
                continue
            owners.setdefault(parts[0], set()).add(name)
            if name in allowed:
                files.setdefault(parts[0], []).append(Path(dist.locate_file(file)))
    site = Path(metadata.distribution("torch").locate_file(""))
    view.mkdir()
    for top, names in owners.items():
        if names <= allowed:
            (view / top).symlink_to(site / top)
            continue
        for path in files.get(top, []):
            target = view / path.relative_to(site)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(path)
    return view


@pytest.mark.slow
def test_the_model_environment_installs_offline_and_serves_with_its_closure_only(served_folder, tmp_path) -> None:
    model = served_folder / "model"
    requirements = (model / "requirements.txt").read_text().split("\n")
    assert not any(line.startswith("saft==") for line in requirements)  # no index serves that
    assert not any(line.startswith("mlflow==") for line in requirements)  # the client, not a server's stack
    assert any(line.startswith("mlflow-skinny==") for line in requirements)
    wheel = [line for line in requirements if line.startswith("wheels/")]
    assert len(wheel) == 1 and (model / wheel[0]).is_file() and "-c constraints.txt" in requirements
    pins = (model / "constraints.txt").read_text().split()
    assert pins == serving_closure() and len(pins) < 120

    site = tmp_path / "site"
    done = _pip("install", "--quiet", "--no-index", "--no-deps", "--target", str(site), str(model / wheel[0]))
    assert done.returncode == 0, done.stderr
    assert (site / "bin" / "saft").is_file()  # the console script comes with it
    assert not (site / "saft" / "models" / "tiny" / "saft-tiny-clip.safetensors").exists()

    view = _closure_view(pins, tmp_path / "closure")
    assert not (view / "kfp").exists() and not (view / "sqlalchemy").exists() and (view / "torch").exists()
    env = {**os.environ, "PYTHONPATH": f"{site}:{view}", "SAFT_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    env.pop("SAFT_BASE_WEIGHTS", None)
    script = (
        "import sys, base64, io, json, saft.cli, mlflow.pyfunc, pandas as pd\n"
        "assert 'kfp' not in sys.modules\n"
        "from PIL import Image\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "buf = io.BytesIO(); Image.new('RGB', (32, 32), (200, 30, 30)).save(buf, format='PNG')\n"
        "out = m.predict(pd.DataFrame({'image': [base64.b64encode(buf.getvalue()).decode()]}))\n"
        "print(json.dumps({'cli': saft.cli.__file__, 'label': out['label'][0]}))\n"
        "sys.argv = ['saft', 'serve', '--help']; saft.cli.main()\n")
    out = subprocess.run([sys.executable, "-S", "-c", script, str(model)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    first = json.loads(out.stdout.splitlines()[0])
    assert first["cli"] == str(site / "saft" / "cli" / "__init__.py") and first["label"]
    assert "models:/NAME@ALIAS" in out.stdout  # `saft serve --help` in the lean environment

    report = tmp_path / "report.json"
    resolved = _pip("install", "--dry-run", "--no-index", "--find-links", "wheels", "-r", "requirements.txt",
                    "--report", str(report), cwd=model)
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    to_install = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    assert to_install == [("saft", "0.1.0")]  # every other pin is what this environment has
