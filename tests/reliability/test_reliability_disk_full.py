"""A full disk: the error names the file and the space left, and nothing half-written is kept (a delta never
without its records, a checkpoint never cut off). Real full filesystems: small tmpfs mounts (skipped where this
process may not mount)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from saft.cli import main


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of ``size`` kB under tmp_path (unmounted at the end)."""
    mounted = []

    def make(name: str, size_kb: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def prepared(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFT_TRACKING", "off")
    assert main(["world", "--out", "W", "--pool-per-class", "4", "--test-per-class", "1"]) == 0
    assert main(["data", "prepare", "W/photo/pool", "--shots", "2", "--val-shots", "0", "--out", "D"]) == 0
    assert main(["score", "--model", "tiny", "--data", "D", "--out", "M", "--batch-size", "8"]) == 0
    return tmp_path


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_full_disk_under_out_leaves_no_delta_without_its_records(prepared: Path, small_disk, capsys) -> None:
    disk = small_disk("out", 12)  # room for the 11 KB delta, not for it and its records
    args = ["finetune", "--model", "tiny", "--data", "D", "--mask", "M/mask.safetensors", "--steps", "2",
            "--batch-size", "8", "--out", str(disk / "F")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left to write" in err[0] and str(disk / "F") in err[0], err
    assert "MiB free there" in err[0] and "--out" in err[0]
    assert _files(disk) == []  # neither the delta nor a temporary: the set appears whole or not at all


@pytest.mark.slow
def test_full_disk_under_the_checkpoints_names_the_checkpoint_and_keeps_none(prepared: Path, small_disk,
                                                                              capsys) -> None:
    disk = small_disk("ckpt", 4)
    args = ["finetune", "--model", "tiny", "--data", "D", "--mask", "M/mask.safetensors", "--steps", "3",
            "--batch-size", "8", "--checkpoint-every", "1", "--checkpoint-dir", str(disk / "C"), "--out", "F"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no space left to write {disk / 'C'}" in err[0], err
    assert "checkpoint" in err[0] and "inline_container" not in err[0]
    assert not [f for f in _files(disk) if f == "checkpoint.pt"]  # never a cut-off checkpoint
    assert not Path("F/delta.safetensors").exists()

