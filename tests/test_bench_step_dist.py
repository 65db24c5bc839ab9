"""``saft bench step --nproc 2``: the saft step as a real torchrun job of 2 CPU ranks (gloo) vs one process.

The benchmark launches its own torchrun job; the test runs the command line as a subprocess
(the environment of tests/test_distributed.py: one thread per process, tracking off) and checks
the report's facts against figures computed here independently: the bytes all-reduced per step
are the mask's values (k = round(density x eligible entries), fp32), not the model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_distributed import SAFT, _run

import saft
from saft.bench.step import StepBenchConfig
from saft.bench.step_dist import run_dist_step_benchmark
from saft.sparse.distributed import NEAR_TIE_TOLERANCE, VALUE_TOLERANCE
from saft.cli import build_parser
from saft.sparse.mask import target_count
from saft.sparse.scores import Eligibility

ARCH, DENSITY, CLASSES = "saft-tiny-vit", 0.01, 4


def test_nproc_defaults_to_one_and_the_global_batch_must_split() -> None:
    assert build_parser().parse_args(["bench", "step"]).nproc == 1
    with pytest.raises(ValueError, match="divide by --nproc 2"):
        run_dist_step_benchmark(StepBenchConfig(arch=ARCH, batch_size=7), 2)
    with pytest.raises(ValueError, match="nproc must be >= 2"):
        run_dist_step_benchmark(StepBenchConfig(arch=ARCH), 1)


@pytest.mark.slow
def test_two_ranks_all_reduce_the_sparse_values_and_train_the_one_process_values(tmp_path: Path) -> None:
    proc = _run(SAFT + ["bench", "step", "--nproc", "2", "--arch", ARCH, "--image-size", "32", "--batch-size", "8",
                        "--num-classes", str(CLASSES), "--density", str(DENSITY), "--warmup", "1", "--repeats", "2",
                        "--out", "r.json"], tmp_path, timeout=180)
    report = json.loads((tmp_path / "r.json").read_text())
    model = saft.load_model(f"{ARCH}@random", seed=0).model
    eligible = sum(p.numel() for p in Eligibility().select(model).values())
    values_bytes = 4 * target_count(DENSITY, eligible)  # one fp32 value per selected entry
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed_dim = model.text_projection.shape[1]

    assert report["config"]["nproc"] == 2 and report["environment"]["backend"] == "gloo"
    assert report["mask"]["eligible"] == eligible and report["values_bytes"] == values_bytes
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert all(r["world"] == 2 and r["images"] == 4 for r in report["ranks"])
    assert report["one_process"]["images"] == 8 and report["one_process"]["all_reduce"]["bytes_per_step"] == 0
    for r in report["ranks"]:
        ar = r["all_reduce"]
        assert ar["grads_bytes"] == values_bytes and ar["same_every_step"]
        assert ar["text_bytes"] in (0, CLASSES * embed_dim * 4)  # the class embeddings' dL/dT, when text trains
        assert ar["bytes_per_step"] == ar["grads_bytes"] + ar["text_bytes"] and ar["other_bytes"] == 0
        assert ar["calls_per_step"] == report["mask"]["tensors_with_selection"] + (ar["text_bytes"] > 0)
        assert r["state"] == {"values": values_bytes, "grads": values_bytes,
                              "optimizer": r["state"]["optimizer"]}
        assert r["state"]["optimizer"] >= 2 * values_bytes  # AdamW's two moments
        assert len(r["step_times_s"]) == 2
    ar = report["all_reduce"]
    assert ar["vs_model_parameter_bytes"] == pytest.approx(ar["bytes_per_step"] / model_bytes)
    assert ar["vs_model_parameter_bytes"] < 0.02
    sc = report["scaling"]
    assert sc["speedup"] == pytest.approx(sc["t_1proc_s"] / sc["t_nproc_s"])
    assert sc["efficiency"] == pytest.approx(sc["speedup"] / 2)
    ok = report["correctness"]
    assert ok["passed"] is True and ok["relative_tolerance"] == VALUE_TOLERANCE
    assert 0 < ok["max_abs_value"] and ok["max_abs_diff"] <= NEAR_TIE_TOLERANCE * ok["max_abs_value"]
    assert "PASS" in proc.stdout and "rank 1 of 2" in proc.stdout
