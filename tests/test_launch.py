"""saft.orchestration.torchrun: a step's command line built from its config, run directly or under torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import SAFT, _env, _run

from saft.steps.configs import ScoreConfig
from saft.orchestration.torchrun import LaunchError, run_step, score_argv, torchrun_command


def test_run_step_refuses_bad_argv_and_a_job_inside_a_job() -> None:
    with pytest.raises(LaunchError, match="score, finetune, evaluate"):
        run_step(["world", "--out", "W"], 2)
    with pytest.raises(LaunchError, match="processes"):
        run_step(["score"], -1)
    with pytest.raises(LaunchError, match="already a torchrun worker"):
        run_step(["score"], 2, env={"WORLD_SIZE": "2", "RANK": "1", "TORCHELASTIC_RUN_ID": "x"})
    assert torchrun_command(["score"], 3, python="py") == ["py", "-m", "torch.distributed.run", "--standalone",
                                                         "--nproc_per_node=3", "-m", "saft.cli", "score"]


@pytest.mark.slow
def test_two_processes_score_the_same_mask_bytes_as_one(tmp_path: Path, monkeypatch) -> None:
    _run(SAFT + ["world", "--out", "W", "--pool-per-class", "4", "--test-per-class", "1"], tmp_path)
    _run(SAFT + ["data", "prepare", "--val-shots", "0", "W/photo/pool", "--shots", "3", "--out", "D"], tmp_path)
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    cfg = ScoreConfig(model="tiny", density=0.01, batch_size=4, device="cpu", num_workers=0)
    lines: list[str] = []
    assert run_step(score_argv(cfg, "D", "M1"), 1) == 0
    assert run_step(score_argv(cfg, "D", "M2"), 2, log=lines.append) == 0
    assert (tmp_path / "M1" / "mask.safetensors").read_bytes() == (tmp_path / "M2" / "mask.safetensors").read_bytes()
    assert any(line.startswith("mask:") for line in lines)  # rank 0's report streamed through log
    # a failing rank's exit code comes back, not 0
    failed: list[str] = []
    assert run_step(score_argv(cfg, "missing", "M3"), 2, log=failed.append) != 0
    assert any("missing" in line for line in failed), failed[-5:]


def test_run_step_runs_one_process_as_a_child(tmp_path: Path) -> None:
    lines: list[str] = []
    code = run_step(["score", "--model", "tiny", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                     "--device", "cpu"], 1, log=lines.append)
    assert code == 2 and lines[0].startswith("launch: score as one process:")
    assert any("nope" in line and "not a prepared data folder" in line for line in lines)  # the child's error
