"""saft.steps.launch: a step's command line built from its config, run directly or under torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import SAFT, _env, _run

from saft.cli import build_parser
from saft.sparse import FinetuneConfig
from saft.steps.evaluate import DeltaRun, EvaluateConfig
from saft.steps.launch import (
    LaunchError,
    evaluate_argv,
    finetune_argv,
    run_step,
    score_argv,
    torchrun_command,
)
from saft.steps.score import ScoreConfig


def test_score_argv_parses_back_to_the_config() -> None:
    cfg = ScoreConfig(model="tiny", density=0.0125, rule="mean_sq", kind="random", include=["visual.*"],
                      exclude=["a", "b"], batch_size=6, seed=3, device="cpu", prompts="eval", text_batch=40,
                      num_workers=0, pin_memory=False, persistent_workers=True)
    args = build_parser().parse_args(score_argv(cfg, "D", "M", root="R"))
    assert (args.model, args.data, args.out, args.root) == ("tiny", "D", "M", "R")
    assert (args.density, args.rule, args.kind, args.include, args.exclude) == (0.0125, "mean_sq", "random",
                                                                                ["visual.*"], ["a", "b"])
    assert (args.batch_size, args.seed, args.device, args.prompts, args.text_batch) == (6, 3, "cpu", "eval", 40)
    assert (args.num_workers, args.pin_memory, args.persistent_workers) == (0, False, True)


def test_finetune_argv_parses_back_to_the_config() -> None:
    cfg = FinetuneConfig(method="random", steps=12, batch_size=8, grad_accum=2, lr=3e-3, weight_decay=0.05,
                         warmup_steps=2, max_grad_norm=None, seed=4, precision="bf16", checkpoint_every=3,
                         num_workers=-1, pin_memory=True, persistent_workers=False, text_batch=64)
    argv = finetune_argv("tiny", cfg, "D", "F", mask_path="M/mask.safetensors", device="cuda", prompts="eval",
                         resume=True, checkpoint_dir="C")
    a = build_parser().parse_args(argv)
    assert (a.method, a.mask, a.steps, a.batch_size, a.grad_accum, a.lr) == ("random", "M/mask.safetensors", 12,
                                                                            8, 2, 3e-3)
    assert (a.weight_decay, a.warmup_steps, a.max_grad_norm, a.seed, a.precision) == (0.05, 2, 0.0, 4, "bf16")
    assert (a.checkpoint_every, a.checkpoint_dir, a.resume, a.device, a.prompts) == (3, "C", True, "cuda", "eval")
    assert (a.num_workers, a.pin_memory, a.persistent_workers, a.text_batch) == (-1, True, False, 64)


def test_finetune_argv_refuses_a_setting_the_command_cannot_carry() -> None:
    with pytest.raises(LaunchError, match="betas"):
        finetune_argv("tiny", FinetuneConfig(betas=(0.8, 0.9)), "D", "F")


def test_evaluate_argv_parses_back_to_the_config() -> None:
    cfg = EvaluateConfig(model="tiny", deltas=[DeltaRun("saft", "F/delta.safetensors", 1),
                                               DeltaRun("full", "G/delta.safetensors")],
                         alphas=[0.5, 1.0], zeroshot=False, batch_size=7, device="cpu", only=["sketch"],
                         reference="none", num_workers=0)
    a = build_parser().parse_args(evaluate_argv(cfg, "toy.yaml", "E", data_root="."))
    assert [DeltaRun.parse(d) for d in a.delta] == cfg.deltas
    assert (a.suite, a.data_root, a.out, a.alpha, a.no_zeroshot) == ("toy.yaml", ".", "E", [0.5, 1.0], True)
    assert (a.batch_size, a.device, a.only, a.reference, a.templates) == (7, "cpu", ["sketch"], "none", "default")


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
    _run(SAFT + ["data", "prepare", "W/textile/pool", "--shots", "3", "--out", "D"], tmp_path)
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


def test_run_step_runs_one_process_in_this_process(tmp_path: Path, capsys) -> None:
    code = run_step(["score", "--model", "tiny", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                     "--device", "cpu"], 1)
    assert code == 2 and "nope" in capsys.readouterr().err  # capsys sees only this process's sys.stderr
