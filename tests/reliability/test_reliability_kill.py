"""A training step SIGKILLed mid-run resumes from its checkpoint and ends bit-identical.

The step runs as a real ``saft finetune`` subprocess (a pod killed by the kubelet gets no
chance to clean up, so neither does this one): it is killed as soon as its first
checkpoint is on disk, the folder is inspected for half-written files, and ``--resume``
must then end with exactly the delta bytes of an uninterrupted run.
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

from saft.sparse.checkpoint import CHECKPOINT_NAME, DIGEST_NAME
from saft.layout import FINETUNE
from saft.steps.finetune import CHECKPOINT_DIR, HISTORY_FILE
from saft.steps.record import RECORD_FILE

SAFT = [sys.executable, "-m", "saft.cli"]
STEPS, EVERY = 12, 3


def _env() -> dict:
    # One thread: bit-identity across runs needs the same reduction order, and the machine is shared.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SAFT_TRACKING": "off",
            "SAFT_PARENT_RUN_ID": ""}


def _saft(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(SAFT + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"saft {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _is_atomic_temp(path: Path) -> bool:
    """saft.io.atomic_path's temporaries: hidden ``.<target name>.<random>.tmp`` beside the target."""
    return path.name.startswith((f".{CHECKPOINT_NAME}.", f".{DIGEST_NAME}.")) and path.name.endswith(".tmp")


@pytest.mark.slow
def test_sigkilled_finetune_resumes_to_the_same_delta(tmp_path: Path) -> None:
    _saft(["world", "--out", "W", "--pool-per-class", "20", "--test-per-class", "1"], tmp_path)
    _saft(["data", "prepare", "--val-shots", "0", "W/photo/pool", "--shots", "4", "--out", "D"], tmp_path)
    _saft(["score", "--model", "tiny", "--data", "D", "--out", "M"], tmp_path)
    train = ["finetune", "--model", "tiny", "--data", "D", "--mask", "M/mask.safetensors",
             "--steps", str(STEPS), "--checkpoint-every", str(EVERY)]

    f1 = tmp_path / "F1"
    ckpt = f1 / CHECKPOINT_DIR / CHECKPOINT_NAME
    proc = subprocess.Popen(SAFT + train + ["--out", "F1"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not ckpt.exists():  # os.replace makes it appear complete, in one step
            assert proc.poll() is None, f"finetune exited ({proc.returncode}) before a checkpoint:\n" \
                                        f"{proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    # Nothing half-written is visible: the step did not finish, so neither its outputs nor
    # its record exist; the only visible file is a complete checkpoint, and a temporary
    # cut off mid-write (possible if the kill landed in a later save) is hidden.
    files = sorted(p.relative_to(f1) for p in f1.rglob("*") if p.is_file())
    visible = [p for p in files if not _is_atomic_temp(p)]
    assert visible == [Path(CHECKPOINT_DIR) / n for n in (CHECKPOINT_NAME, DIGEST_NAME)], \
        f"unexpected files after the kill: {files}"
    assert not (f1 / FINETUNE.delta).exists() and not (f1 / RECORD_FILE).exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # complete and readable
    killed_at = state["step"]
    assert killed_at in range(EVERY, STEPS, EVERY), killed_at
    assert len(state["history"]) == killed_at

    _saft(train + ["--out", "F1", "--resume"], tmp_path)
    _saft(train + ["--out", "F2"], tmp_path)

    assert (f1 / FINETUNE.delta).read_bytes() == (tmp_path / "F2" / FINETUNE.delta).read_bytes()
    # It really resumed: the first records are the checkpoint's, timings included (a
    # restart from step 0 would have measured new images/s values).
    resumed = json.loads((f1 / HISTORY_FILE).read_text())
    assert len(resumed) == STEPS
    assert resumed[:killed_at] == json.loads(json.dumps(state["history"]))
