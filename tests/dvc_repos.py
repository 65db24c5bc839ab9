"""A real git + DVC repository with one DVC-tracked folder at two committed versions."""

from __future__ import annotations

import subprocess
from pathlib import Path

from image_trees import write_image, write_tree


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def make_dvc_repo(repo: Path, monkeypatch) -> tuple[str, str]:
    """``repo`` with data/ds (24 images, then 3 more) committed twice; returns (rev1, rev2).

    DVC runs through its Python API, its site cache and global config kept in ``repo``'s parent.
    """
    from dvc.repo import Repo

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(repo.parent / "dvc-site-cache"))
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(repo.parent / "dvc-global"))
    repo.mkdir(parents=True)
    git(repo, "init", "-q")
    for key, value in (("user.email", "t@example.invalid"), ("user.name", "t"), ("commit.gpgsign", "false")):
        git(repo, "config", key, value)
    dvc = Repo.init(str(repo))
    write_tree(repo / "data" / "ds")
    dvc.add(str(repo / "data" / "ds"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "ds v1")
    rev1 = git(repo, "rev-parse", "HEAD")
    for i in range(3):
        write_image(repo / "data" / "ds" / "cat" / f"extra{i}.png", 500 + i)
    dvc.add(str(repo / "data" / "ds"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "ds v2")
    return rev1, git(repo, "rev-parse", "HEAD")
