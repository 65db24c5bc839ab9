"""``saft score``, ``finetune`` and ``evaluate`` under torchrun with 2 CPU processes (gloo).

Each command runs as a real ``torchrun --standalone --nproc_per_node=2`` job launched from
the test, next to the same command as one process: the mask bytes are identical, the
delta agrees within the stated tolerance (fp32 sums in another order), the metrics are
identical, and a job with one rank SIGKILLed resumes from rank 0's checkpoint to the
uninterrupted job's delta.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import saft
from saft.sparse.checkpoint import CHECKPOINT_NAME
from saft.sparse.distributed import values_agree
from saft.steps.finetune import CHECKPOINT_DIR

SAFT = [sys.executable, "-m", "saft.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "saft.cli"]

pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SAFT_TRACKING": "off",
            "SAFT_PARENT_RUN_ID": "", "SAFT_DIST_TIMEOUT_S": "120"}


def _run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


DRIVER = str(Path(__file__).with_name("dist_driver.py"))
SCORE = ["score", "--model", "tiny", "--data", "D", "--batch-size", "4", "--density", "0.01", "--device", "cpu"]
FINETUNE = ["finetune", "--model", "tiny", "--data", "D", "--steps", "8", "--batch-size", "8", "--lr", "3e-3",
            "--checkpoint-every", "2", "--device", "cpu"]
EVALUATE = ["evaluate", "--model", "tiny", "--suite", "toy.yaml", "--data-root", ".", "--batch-size", "7",
            "--device", "cpu"]


def _commands(tag: str) -> list[str]:
    """score -> finetune -> evaluate into folders suffixed ``tag`` (1: one process, 2: two)."""
    return [json.dumps(SCORE + ["--out", f"M{tag}"]),
            json.dumps(FINETUNE + ["--mask", f"M{tag}/mask.safetensors", "--out", f"F{tag}"]),
            json.dumps(EVALUATE + ["--delta", f"saft:1=F{tag}/delta.safetensors", "--out", f"E{tag}"])]


def toy_world(base: Path, *, pool: int, test: int, shots: int) -> Path:
    """In ``base``: the world ``W``, ``shots`` per class of its ID (photo) pool prepared in ``D``, ``toy.yaml``
    (photo ID, sketch OOD)."""
    _run(SAFT + ["world", "--out", "W", "--pool-per-class", str(pool), "--test-per-class", str(test)], base)
    _run(SAFT + ["data", "prepare", "--val-shots", "0", "W/photo/pool", "--shots", str(shots), "--out", "D"], base)
    suite = {"name": "toy", "datasets": [
        {"name": "photo", "dataset": "imagefolder", "root": "W/photo/test", "role": "id"},
        {"name": "sketch", "dataset": "imagefolder", "root": "W/sketch/test", "role": "ood"}]}
    (base / "toy.yaml").write_text(yaml.safe_dump(suite))
    return base


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """The same three steps as one process and as one torchrun job of two."""
    base = toy_world(tmp_path_factory.mktemp("dist"), pool=10, test=4, shots=3)  # 30 training images
    _run([sys.executable, DRIVER, *_commands("1")], base)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", DRIVER,
                 *_commands("2")], base, timeout=400)
    base.joinpath("job2.out").write_text(proc.stdout)
    return base


def test_score_mask_bytes_equal_one_process(job: Path) -> None:
    assert (job / "M1" / "mask.safetensors").read_bytes() == (job / "M2" / "mask.safetensors").read_bytes()
    assert json.loads((job / "M2" / "score.json").read_text())["processes"] == 2
    assert (job / "job2.out").read_text().count("mask:") == 1  # only rank 0 reports


def test_finetune_delta_matches_one_process_with_the_same_global_batch(job: Path) -> None:
    one, two = saft.load_delta(job / "F1" / "delta.safetensors"), saft.load_delta(job / "F2" / "delta.safetensors")
    assert set(one.values) == set(two.values)
    for name in one.values:
        assert torch.equal(one.indices[name], two.indices[name])
        check = values_agree(one.values[name], two.values[name])
        assert check["passed"], (name, check)
    h1 = json.loads((job / "F1" / "history.json").read_text())
    h2 = json.loads((job / "F2" / "history.json").read_text())
    assert [round(h["loss"], 4) for h in h1] == [round(h["loss"], 4) for h in h2]  # logged over the global batch
    assert json.loads((job / "F2" / "finetune.json").read_text())["processes"] == 2


def test_evaluate_metrics_equal_one_process(job: Path) -> None:
    r1 = json.loads((job / "E1" / "metrics.json").read_text())["records"]
    r2 = json.loads((job / "E2" / "metrics.json").read_text())["records"]
    key = lambda r: (r["model"], r["dataset"], r["seed"], r["alpha"])  # noqa: E731
    assert sorted((key(r), r["top1"], r["n"]) for r in r1) == sorted((key(r), r["top1"], r["n"]) for r in r2)
    assert {r["n"] for r in r1} == {40} and len(r1) == 4  # zero-shot and the delta on both sets


def test_a_job_with_one_rank_killed_resumes_to_the_uninterrupted_delta(job: Path) -> None:
    args = FINETUNE + ["--mask", "M1/mask.safetensors"]
    ckpt = job / "K1" / CHECKPOINT_DIR / CHECKPOINT_NAME
    launcher = subprocess.Popen(TORCHRUN + args + ["--out", "K1"], cwd=job, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not ckpt.is_file():
            assert launcher.poll() is None, "the job ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        workers = _children_running("saft.cli", launcher.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)  # one rank dies, as on a lost GPU or node
        assert launcher.wait(timeout=120) != 0  # torchrun tears the job down and fails
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert not (job / "K1" / "delta.safetensors").exists()
    _run(TORCHRUN + args + ["--out", "K1", "--resume"], job)
    # F2: the same job (mask M1 = M2, byte for byte) uninterrupted
    a, b = saft.load_delta(job / "F2" / "delta.safetensors"), saft.load_delta(job / "K1" / "delta.safetensors")
    for name in a.values:
        assert torch.equal(a.values[name], b.values[name]), name


def _children_running(needle: str, ancestor: int) -> list[int]:
    """Descendant pids of ``ancestor`` whose command line contains ``needle`` (the torchrun workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if needle in cmdline and "torch.distributed.run" not in cmdline and _descends(ppid, ancestor):
            found.append(int(entry.name))
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False
