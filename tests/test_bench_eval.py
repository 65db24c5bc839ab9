"""`saft bench eval`: saft's evaluation path against a plain open_clip loop, on 200 generated images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saft.bench.eval import generate_set
from saft.cli import main


def test_generate_set_writes_exactly_n_and_reuses_files(tmp_path: Path) -> None:
    root = generate_set(tmp_path / "set", 23)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 23 and len({f.parent.name for f in files}) == 10
    stamp = {f: f.stat().st_mtime_ns for f in files}
    generate_set(root, 23)  # nothing re-rendered
    assert {f: f.stat().st_mtime_ns for f in root.rglob("*.png")} == stamp
    assert not [p for p in root.rglob(".*")]  # atomic writes leave no temporaries


def test_bench_eval_measures_both_paths_in_one_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    data = tmp_path / "images"
    code = main(["bench", "eval", "--images", "200", "--batch-size", "64", "--threads", "1", "--data", str(data),
                 "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "open_clip" in text and "saft / open_clip: images/s" in text
    report = json.loads(out.read_text())
    paths = report["paths"]
    assert set(paths) == {"open_clip", "saft"}
    for r in paths.values():
        assert r["images"] == 200 and r["images_per_s"] > 0 and r["threads"] == 1
        assert r["peak_rss_bytes"] > 0 and r["peak_rss_in_loop_bytes"] >= r["rss_before_loop_bytes"] > 0
    # Same weights, preprocessing and head recipe: the two loops must agree on every image.
    assert paths["saft"]["top1"] == paths["open_clip"]["top1"]
    ratios = report["ratios_saft_vs_open_clip"]
    assert ratios["images_per_s"] == pytest.approx(paths["saft"]["images_per_s"] / paths["open_clip"]["images_per_s"])
    assert ratios["peak_rss"] > 0

    # A folder holding another number of images is refused rather than silently measured.
    assert main(["bench", "eval", "--images", "150", "--data", str(data)]) == 2
    assert "holds 200 images, not 150" in capsys.readouterr().err
