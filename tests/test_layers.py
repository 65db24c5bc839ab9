"""The layers of src/saft hold (pyproject.toml [tool.importlinter]): cli -> bench -> orchestration/protocols ->
steps -> tracking -> serving -> eval -> world -> data -> sparse -> models -> utilities, lazy imports included;
the library imports no pipeline or cloud stack; no package has an import cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout
