"""saft.layout owns the artifact folders' file names: folders are checked against it, and no other module of
src/saft spells one of those names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from saft.layout import FINETUNE, LAYOUTS, PREPARED, LayoutError

SRC = Path(__file__).resolve().parents[1] / "src" / "saft"


def test_a_folder_is_checked_against_its_layout_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match=r"no such folder \(expected a finetune output folder, made by `saft finetune"):
        FINETUNE.check(tmp_path / "nowhere")
    (tmp_path / FINETUNE.delta).write_bytes(b"")
    with pytest.raises(LayoutError, match=r"not a finetune output folder \(missing history.json, finetune.json\)"):
        FINETUNE.check(tmp_path)
    (tmp_path / FINETUNE.record).write_text("{not json")
    with pytest.raises(LayoutError, match="finetune.json: not valid JSON"):
        FINETUNE.read_json(tmp_path, "record")
    with pytest.raises(LayoutError, match="make one with `saft data prepare ROOT --out FOLDER`"):
        PREPARED.check(tmp_path)


def test_no_module_but_saft_layout_spells_an_artifact_file_name() -> None:
    names = {n for layout in LAYOUTS for field, n in layout.names().items() if "." in n}
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "layout.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and node.value in names:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
    assert not found, "spell these through saft.layout:\n" + "\n".join(found)


def test_the_benchmark_wiseft_and_base_file_names_are_layout_names_too() -> None:
    owned = {n for layout in LAYOUTS for n in layout.names().values()}
    assert {"wiseft.json", "wiseft.png", "chosen_lr.json", "fewshot.json", "fewshot.md", "fewshot.png",
            "weights.safetensors", "delta.safetensors"} <= owned
    # the delta's name is spelled once, not re-exported under an alias by the modules that use it
    aliased = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
               if any(isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DELTA_FILE"
                                                        for t in n.targets) for n in ast.walk(ast.parse(p.read_text())))]
    assert not aliased, aliased
